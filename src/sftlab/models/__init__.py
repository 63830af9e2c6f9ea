"""Load pretrained models (packaged name, local folder, hub id) with a task head."""
from .load import load_model, load_tokenizer, resolve_model  # noqa: F401

"""`hf` and `merged`: a plain Hugging Face folder (config.json with the label names, model.safetensors, tokenizer)
that `transformers.pipeline` and `AutoModelFor*.from_pretrained` load as-is. An adapter run is merged first (a
plain folder cannot hold an adapter), so for LoRA/DoRA runs `hf` and `merged` write the same folder."""
from __future__ import annotations

from pathlib import Path

from .merged import fold, label_config


def write_hf(model, tokenizer, meta: dict, out: Path) -> dict:
    merged = fold(model)
    label_config(merged, meta)
    merged.save_pretrained(out)  # safetensors; transformers 5 writes nothing else
    tokenizer.save_pretrained(out)
    return {"merged_adapter": bool(meta.get("adapter"))}

"""`sftlab serve`: an HTTP API (FastAPI + uvicorn) in front of an exported model or a run directory.
Imports nothing from sftlab.train (docs/serve.md)."""
from .app import create_app  # noqa: F401
from .settings import ServeSettings, make_settings  # noqa: F401

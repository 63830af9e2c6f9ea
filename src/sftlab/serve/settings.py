"""Server settings: network, auth, request limits, micro-batching, time limits. Typed and validated at start.

Every limit has a safe default: a server started with no options binds loopback only, caps what one request may
ask for, and answers overload with 429 and slowness with 504 instead of queueing without bound.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError

TOKEN_ENV = "SFTLAB_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default; anything else without a token prints a warning."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0: any free port; the URL printed on stderr names the one chosen)."""
    token: str | None = None
    """Bearer token required on every route but /health (default: env SFTLAB_SERVE_TOKEN; none = open)."""

    max_batch_size: int = Field(64, ge=1, le=4096)
    """Most texts in one forward pass: concurrent requests are merged up to this many texts..."""
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    """...or until the oldest waiting text has waited this long (counted from when the model became free, if later),
    whichever comes first."""
    batch_tokens: int = Field(16_384, ge=1)
    """Padded tokens per forward pass: a length-sorted micro-batch of long texts is split to stay under this."""
    max_queue: int = Field(2048, ge=1)
    """Texts waiting for the model (classify); more -> 429. Generation: `max_queue_generate` requests."""
    max_queue_generate: int = Field(8, ge=1)
    """Generation requests waiting or running (they run one at a time); more -> 429."""
    timeout_s: float = Field(30.0, gt=0, le=3600)
    """Per-request time limit (queue wait + inference). Over it -> 504; queued work is dropped, generation stops."""

    max_texts: int = Field(256, ge=1)
    """Texts (or pairs) in one /v1/classify request; more -> 413."""
    max_chars: int = Field(20_000, ge=1)
    """Characters per text, per prompt, and per chat message; more -> 413."""
    max_messages: int = Field(256, ge=1)
    """Messages in one chat completion request; more -> 413."""
    max_new_tokens: int = Field(1024, ge=1)
    """Largest max_new_tokens / max_tokens a request may ask for; more -> 422."""
    default_new_tokens: int = Field(256, ge=1)
    """max_new_tokens when a generation request gives none (capped at max_new_tokens)."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Request body size (Content-Length, or counted while streaming in for chunked bodies); more -> 413."""

    max_connections: int = Field(256, ge=1)
    """Open connections at once; one more is answered 503 and closed (each costs a socket and a buffer)."""
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    """Request line + headers of one request; more -> 431 and the connection closes."""
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Time to send the request line and headers (from connecting, or from the start of a keep-alive request);
    over it -> 408 and close: a half-sent request does not hold a connection."""
    body_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Time for the body to arrive once the headers are in (4 MB at the default --max-body-bytes); over it -> 408."""

    threads: int | None = Field(None, ge=1)
    """torch intra-op threads of the inference thread (default: all cores). `sftlab serve` also makes idle OpenMP
    threads sleep rather than spin (OMP_WAIT_POLICY=PASSIVE unless set), so they do not starve the event loop."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Classification forward passes. auto: bf16 autocast where this machine's bf16 matmuls are measured faster than
    fp32 (CUDA with bf16, CPUs with AMX; src/sftlab/precision.py), else fp32. fp32: answers equal offline fp32 predictions to 1e-5; bf16:
    probabilities move by ~1e-2 (SST-2 dev: same accuracy, 0 of 872 labels changed; docs/serve.md)."""

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and (not v or v != v.strip() or any(ord(c) < 33 or ord(c) > 126 for c in v)):
            raise ValueError("must be non-empty printable ASCII without spaces (it travels in an HTTP header)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_texts > self.max_queue:
            raise ValueError(f"max_texts ({self.max_texts}) is over max_queue ({self.max_queue}): such a request "
                             f"could never be queued; lower --max-texts or raise --max-queue")
        return self

    @property
    def torch_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")


def make_settings(**values) -> ServeSettings:
    """ServeSettings from keyword values, None meaning 'default'; the token falls back to env SFTLAB_SERVE_TOKEN.
    A bad value raises ConfigError naming the option."""
    values = {k: v for k, v in values.items() if v is not None}
    if "token" not in values and os.environ.get(TOKEN_ENV):
        values["token"] = os.environ[TOKEN_ENV]
    try:
        return ServeSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(f"serve --{key.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None

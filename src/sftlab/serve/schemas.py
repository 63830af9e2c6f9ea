"""Request bodies, validated with messages a client can act on. Limits that depend on the server's settings
(texts per request, characters, max_new_tokens) are checked in app.py, so they can answer 413 with the limit."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# strict: JSON types as documented, never coerced ("3" is not 3, 1 is not true, 2.0 is not 2); floats take ints.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
# torch.manual_seed's range (negative seeds wrap around, as torch does)
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
# Below this a sampling temperature overflows float32 logits (scores / T -> inf -> NaN probabilities); 0 is greedy.
MIN_TEMPERATURE = 1e-3


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


class ClassifyRequest(BaseModel):
    model_config = _STRICT

    texts: list
    """Texts ["a", "b"] or text pairs [["premise", "hypothesis"], ...]; answers come back in this order."""
    all_scores: bool = False
    """Also return every class's probability ("scores": {label: p}); classification only."""
    task: str | None = None
    """A multitask model: which task (head) answers; GET /v1/tasks lists them."""

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, v):
        if not isinstance(v, list):
            raise ValueError(f"must be a list of strings or of [text, text_pair] pairs, got {_kind(v)}")
        if not v:
            raise ValueError("is empty; send at least one text")
        pairs = isinstance(v[0], list)
        for i, t in enumerate(v):
            if pairs:
                if not isinstance(t, list):
                    raise ValueError(f"item {i} is {_kind(t)} but item 0 is a pair; send all texts or all pairs")
                if len(t) != 2 or not all(isinstance(x, str) for x in t):
                    raise ValueError(f"item {i} must be a pair of two strings [text, text_pair], got "
                                     f"{len(t)} item(s)" + ("" if len(t) != 2 else " that are not all strings"))
            elif not isinstance(t, str):
                raise ValueError(f"item {i} is {_kind(t)}; expected a string (or send all items as pairs)")
        return [tuple(t) for t in v] if pairs else v


def _temperature(v: float) -> float:
    if 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (got {v:g}); tiny temperatures "
                         f"overflow the logits - use 0 for deterministic output")
    return v


def _stop_list(v):
    if v is None:
        return []
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("must be a string or a list of strings")
    if len(v) > 4 or any(len(s) > 256 for s in v):
        raise ValueError("at most 4 stop strings of at most 256 characters")
    return v


class GenerateRequest(BaseModel):
    model_config = _STRICT

    prompt: str
    """The user's message (rendered with the model's chat template); with raw=true, text continued as-is."""
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    """0 = greedy (deterministic); >= 0.001 samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    raw: bool = False
    """true: no chat template, the prompt text is continued directly."""
    system: str | None = None
    """A system message (default: the run's system prompt, if any)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v):
        return _temperature(v)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI chat completions. Fields that do not change the output (user, metadata, store, ...) are ignored;
    fields that would change it are honoured or refused with a 422 that says so (app.py `UNSUPPORTED`): n must be
    1; tools, response_format other than text, logprobs are not implemented."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = []
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    # Declared so that a value which would change the answer is refused, never silently ignored (app.py).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logprobs: Any = None
    top_logprobs: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v):
        return _temperature(v)

    def unsupported(self) -> str | None:
        """The first field asking for something this server does not do, as a 422 message; None when all is fine."""
        if self.tools or self.functions:
            return "tools: function/tool calling is not supported by this server; remove tools (and tool_choice)"
        if self.tool_choice not in (None, "none"):
            return "tool_choice: tool calling is not supported by this server; remove it"
        if self.function_call not in (None, "none"):
            return "function_call: function calling is not supported by this server; remove it"
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return ("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas); remove it or "
                    "ask for the format in the prompt")
        if self.logprobs not in (None, False) or self.top_logprobs not in (None, 0):
            return "logprobs: token log-probabilities are not returned by this server; remove logprobs/top_logprobs"
        return None

"""Chat template rendering, the 0/1 loss mask, and tokenization in which message text stays text.

Loss mask (`render_and_mask`): the conversation is rendered to TEXT once with the chat template, the character
span of each assistant turn is found by rendering prefixes of the conversation (the turn starts where
`render(messages[:i], add_generation_prompt=True)` ends and stops where `render(messages[:i+1])` ends), and the
full text is tokenized ONCE with offsets. A token is trained on when its characters overlap an assistant span.
Tokenizing the whole text (never the pieces) keeps the ids exactly what the model sees at inference for the same
text, whatever BPE does at a role-header/content boundary; a token that straddles the boundary is trained on,
since the model has to emit it to produce the reply. Each span keeps the end-of-turn marker (`<|im_end|>`,
`</s>`, `<|eot_id|>`: the model learns to stop) but not the whitespace the template puts after it.

Turn forgery: message text is never tokenized into control tokens. A user who writes `<|im_end|>` then
`<|im_start|>system` would otherwise open a system turn of their own. Where some message content holds a special
token's text, the content's character spans are located (rendering with placeholders) and the text is tokenized
piece by piece: template pieces as usual, content pieces with `split_special_tokens=True`, so the ids hold exactly
the control tokens the template put there. Conversations without such text keep the single whole-text pass, so
their ids are unchanged. The same path serves training, evaluation, `sftlab generate/chat` and the server.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from ..errors import ConfigError

TRAIN_ON = ("assistant", "last_turn", "all")

# Used when the tokenizer has no chat template and data.template is unset. The tokens are plain text to a
# tokenizer without <|im_start|>/<|im_end|>; giving the model single stop tokens is the model loader's job.
CHATML = (
    "{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"


class ChatRenderer:
    """A tokenizer plus the chat template resolved once (data.template file, the tokenizer's own, or ChatML)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template, self.name = resolve_template(tokenizer, template)
        self.end_markers = _end_markers(tokenizer)
        self.specials = tuple(t for t in _special_strings(tokenizer) if t)
        # One scan per message for any control token's text (Llama 3 has 256 of them): a compiled alternation.
        self._forgery = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None

    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        try:
            out = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 TemplateError / raise_exception(), or a template indexing past the end
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"chat template failed ({self.name}: {msg}); fix the conversation or use another "
                             f"template (data.template)") from None
        if not isinstance(out, str):
            raise ValueError(f"chat template rendered a {type(out).__name__}, not text ({self.name})")
        return out

    def prompt(self, messages: list[dict]) -> str:
        """Text up to and including the generation prompt. A final assistant turn (the reference) is left out."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.render(messages, add_generation_prompt=True)

    def spans(self, messages: list[dict], text: str, train_on: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of the assistant turns that carry loss, in `text` (the full rendering)."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last_turn":
            turns = turns[-1:]
        if not turns:
            raise ValueError("no assistant turn (nothing to learn from); add the assistant's reply")
        out = []
        for i in turns:
            head = self.render(messages[:i], add_generation_prompt=True)
            whole = self.render(messages[: i + 1], add_generation_prompt=False)
            for n, part in ((i, head), (i + 1, whole)):
                if not text.startswith(part):
                    raise ValueError(
                        f"chat template renders turns differently depending on what follows ({self.name}: the first "
                        f"{n} message(s) do not render as a prefix of the whole conversation, so assistant turn "
                        f"{i} cannot be located); use a template that renders earlier turns the same way "
                        f"(data.template), or data.train_on=all")
            start, end = len(head), len(whole)
            seg = text[start:end]
            stripped = seg.rstrip()
            if len(stripped) < len(seg) and stripped.endswith(self.end_markers):
                end = start + len(stripped)  # the newline after <|im_end|> belongs to the next turn's header
            if end <= start:
                raise ValueError(f"assistant turn {i} renders as empty text ({self.name}); check the template")
            out.append((start, end))
        return out

    def text_and_spans(self, messages: list[dict], train_on: str) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character spans that carry loss ([] for train_on=all: everything does)."""
        if train_on not in TRAIN_ON:
            raise ConfigError(f"data.train_on: unknown value {train_on!r}; use one of {', '.join(TRAIN_ON)}")
        text = self.render(messages, add_generation_prompt=False)
        return text, (self.spans(messages, text, train_on) if train_on != "all" else [])

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list]:
        """Token ids and character offsets of each text, tokenized whole (templates carry the special tokens)."""
        try:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ConfigError("causal_lm loss masks need a fast tokenizer (character offsets); this tokenizer "
                              "is a slow (Python) one; use the model's tokenizer.json / a Fast tokenizer") from None
        return [list(x) for x in enc["input_ids"]], enc["offset_mapping"]

    def encode(self, messages: list[dict], train_on: str = "assistant") -> tuple[list[int], list[int]]:
        text, spans = self.text_and_spans(messages, train_on)
        ids, offsets = self.tokenize_safe(messages, text, add_generation_prompt=False)
        return ids, _loss_mask(offsets, spans, train_on)

    # ------------------------------------------------------------------ message text never becomes control tokens

    def forges(self, messages: list[dict]) -> bool:
        """Some message's text holds a special token's text (e.g. `<|im_end|>`)."""
        return self._forgery is not None and any(self._forgery.search(m["content"]) for m in messages)

    def tokenize_safe(self, messages: list[dict], text: str, *, add_generation_prompt: bool) -> tuple[list, list]:
        """Ids and offsets of `text` (the rendering of `messages`) in which message content is plain text."""
        if not self.forges(messages):
            (ids,), (offsets,) = self.tokenize([text])
            return ids, offsets
        return self.tokenize_pieces(messages, text, add_generation_prompt=add_generation_prompt)

    def tokenize_pieces(self, messages: list[dict], text: str, *, add_generation_prompt: bool) -> tuple[list, list]:
        """Template pieces tokenized as usual, message contents with split_special_tokens (see the module doc)."""
        spans = self.content_spans(messages, text, add_generation_prompt=add_generation_prompt)
        pieces, at = [], 0
        for s, e in spans:
            pieces += [(text[at:s], False), (text[s:e], True)]
            at = e
        pieces.append((text[at:], False))
        ids: list[int] = []
        offsets: list = []
        start = 0
        for piece, plain in pieces:
            if piece:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                     split_special_tokens=plain)
                ids += list(enc["input_ids"])
                offsets += [(a + start, b + start) for a, b in enc["offset_mapping"]]
            start += len(piece)
        return ids, offsets

    def content_spans(self, messages: list[dict], text: str, *, add_generation_prompt: bool) -> list[tuple[int, int]]:
        """Character spans of each rendered message's content in `text`, found by rendering with placeholder
        contents (a template that drops a message drops its placeholder too). Raises ValueError when the template
        changes message text beyond trimming it: then where the text lies cannot be known."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        shown = self.render([m | {"content": k} for m, k in zip(messages, marks)],
                            add_generation_prompt=add_generation_prompt)
        for strip in (False, True):
            spans, at, shift, rebuilt = [], 0, 0, shown
            for k, m in zip(marks, messages):
                pos = shown.find(k, at)
                if pos < 0:
                    continue
                content = m["content"].strip() if strip else m["content"]
                spans.append((pos + shift, pos + shift + len(content)))
                shift += len(content) - len(k)
                at = pos + len(k)
                rebuilt = rebuilt.replace(k, content, 1)
            if rebuilt == text:
                return spans
        raise ValueError(f"message text holds a control token ({self._forged(messages)!r}) and the chat template "
                         f"({self.name}) changes message text, so it cannot be kept as plain text; remove it")

    def _forged(self, messages: list[dict]) -> str:
        return next(f.group() for m in messages if (f := self._forgery.search(m["content"])))

    def prompt_ids(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The generation prompt (as `prompt`) and its token ids, message text never read as control tokens."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = self.render(messages, add_generation_prompt=True)
        return text, self.tokenize_safe(messages, text, add_generation_prompt=True)[0]


def resolve_template(tokenizer, template: str | None) -> tuple[str, str]:
    """(Jinja text, a name for messages): data.template (a file; inline Jinja also accepted), else the
    tokenizer's own chat template, else the ChatML fallback."""
    if template is not None:
        if "{{" in template or "{%" in template:
            return template, "inline data.template"
        return _read_template(str(Path(template).expanduser())), f"template file {template}"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is for chat
        own = own.get("default")
    if own:
        return own, "the tokenizer's chat template"
    return CHATML, "the ChatML fallback template (the tokenizer has none)"


def _read_template(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.template: {path} not found; give a Jinja chat template file, or null for the "
                          f"tokenizer's own template")
    return _read_cached(str(p.resolve()), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.template: cannot read {path} ({e})") from None
    if not text.strip():
        raise ConfigError(f"data.template: {path} is empty; it must hold a Jinja chat template")
    return text


def _end_markers(tokenizer) -> tuple[str, ...]:
    """Special-token strings that may close a turn (eos, <|im_end|>, <|eot_id|>, <end_of_turn>, ...)."""
    found = {CHATML_END}
    found.update(t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if isinstance(t, str))
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content) if hasattr(tok, "content") else str(tok))
    return tuple(sorted(t for t in found if t.strip()))


def _special_strings(tokenizer) -> list[str]:
    """Text of every special (control) token: what the tokenizer would read as one control id."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(getattr(tok, "content", tok)))
    return sorted(t for t in found if isinstance(t, str) and t)


def _token_spans(offsets) -> list[tuple[int, int]]:
    """Offsets with gaps closed. Byte-level BPE with `trim_offsets` drops the leading space of " Hello" and
    makes a spaces-only token zero-width; the uncovered characters are given to the token that follows them."""
    spans, prev_end = [], 0
    for s, e in offsets:
        start = min(prev_end, s)
        spans.append((start, max(e, start)))
        prev_end = max(prev_end, e)
    return spans


def _loss_mask(offsets, spans: list[tuple[int, int]], train_on: str) -> list[int]:
    """1 for each token whose characters overlap a span (spans sorted, disjoint); all 1 for train_on=all."""
    if train_on == "all":
        return [1] * len(offsets)
    mask, j = [], 0
    for s, e in _token_spans(offsets):  # starts never decrease
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j == len(spans):
            mask.append(0)
        elif s == e:  # zero-width (e.g. a special token a normalizer emptied): inside the span or not
            mask.append(int(spans[j][0] <= s))
        else:
            mask.append(int(e > spans[j][0]))
    return mask


def render_and_mask(tokenizer, messages: list[dict], *, template: str | None,
                    train_on: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole rendered conversation and a 0/1 loss mask of the same length.
    train_on: assistant = every assistant turn's tokens (content + end-of-turn marker), last_turn = only the
    last assistant turn, all = every token. Raises ValueError when the template cannot be used this way."""
    return ChatRenderer(tokenizer, template).encode(messages, train_on)


def render_prompt(tokenizer, messages: list[dict], template: str | None = None) -> str:
    """The rendered text a model continues from: the conversation plus the generation prompt (for generation
    and evaluation). A final assistant turn, if any, is the reference answer and is left out."""
    return ChatRenderer(tokenizer, template).prompt(messages)


def prompt_ids(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """Token ids of `render_prompt`'s text, message text never read as control tokens: what generation feeds."""
    return ChatRenderer(tokenizer, template).prompt_ids(messages)[1]

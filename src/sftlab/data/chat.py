"""Causal-LM (instruction / chat) data: rows -> conversations -> token ids + a 0/1 loss mask.

Rows in any of four layouts (alpaca incl. the seed-task `instances` layout, prompt/completion, chat `messages`,
ShareGPT `conversations`) become one list of {role, content} messages each, validated like `examples.py`:
the first bad row stops with file:line and a fix, or with `data.skip_invalid` it is skipped and counted.

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
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .read import Table

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LAYOUTS = ("instruction + output [+ input] (alpaca), instruction + instances (alpaca seed tasks), "
           "prompt + completion, messages [{role, content}], conversations [{from, value}] (sharegpt)")
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


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # [{"role": system|user|assistant, "content": str}], ends with assistant
    line: int  # line (or record number) of the row it came from; seed-task instances share their row's line
    source: str = ""  # file it came from, for file:line messages after tokenization


# ----------------------------------------------------------------------------------------------- rows


def rows_to_conversations(table: Table, cfg: DataConfig) -> tuple[list[Conversation], Counter]:
    """Every row of `table` -> Conversations (a seed-task row gives one per instance), plus skipped reasons."""
    if not table.rows and not table.bad:
        raise DataError(f"{table.source}: no data rows (only a header?)")
    if table.rows and not isinstance(table.rows[0][1], dict) and not table.columns:
        raise DataError(f"{table.source}: causal_lm rows need named fields; use JSONL/JSON/Parquet, or a CSV/TSV "
                        f"with a header row (instruction,input,output or prompt,completion)")
    skipped: Counter = Counter()
    for _, reason in table.bad:
        skipped[reason.split(" (")[0]] += 1
    convs: list[Conversation] = []

    def bad(line: int, err: ValueError) -> None:
        if not cfg.skip_invalid:
            raise DataError(f"{table.source}:{line}: {err} (or set data.skip_invalid=true to skip such rows)") from None
        skipped[_kind(str(err))] += 1

    for line, row in table.rows:
        record = row if isinstance(row, dict) else dict(zip(table.columns, row))
        try:
            fmt = cfg.format if cfg.format != "auto" else _detect(record)
            candidates = _PARSERS[fmt](record)
        except ValueError as e:
            bad(line, e)
            continue
        for turns in candidates:  # one per seed-task instance, else exactly one
            try:
                if isinstance(turns, ValueError):
                    raise turns
                messages = _validate(turns, *_ROLE_SETS[fmt])
            except ValueError as e:
                bad(line, e)
                continue
            if cfg.system_prompt and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            convs.append(Conversation(messages, line, table.source))
    if not convs:
        raise DataError(f"{table.source}: no valid rows left (skipped: {dict(skipped)})")
    return convs, skipped


def _kind(message: str) -> str:
    """Skip counts by kind, not by value: "unknown role 'bot' (messages[1]); use ..." -> "unknown role"."""
    return message.split(";")[0].split(" (")[0]


def _detect(r: dict) -> str:
    if "messages" in r:
        return "messages"
    if "conversations" in r:
        return "sharegpt"
    if "instruction" in r:
        return "alpaca"
    if "prompt" in r and "completion" in r:
        return "prompt_completion"
    raise ValueError(f"format not detected (keys: {sorted(map(str, r))}); accepted layouts: {LAYOUTS}; "
                     f"rename the fields or set data.format")


Turn = tuple[Any, Any, str]  # (raw role, raw content, where in the row: "messages[2]", "output", ...)


def _need(r: dict, key: str, fmt: str, layout: str) -> Any:
    if key not in r:
        raise ValueError(f"missing field ({key}); data.format={fmt} rows need {layout}, this row has "
                         f"{sorted(map(str, r))}")
    return r[key]


def _alpaca(r: dict) -> list[list[Turn] | ValueError]:
    layout = "instruction, optional input, and output (or instances: [{input, output}])"
    instruction = _need(r, "instruction", "alpaca", layout)
    if "output" in r or "instances" not in r:
        _need(r, "output", "alpaca", layout)
        return [_alpaca_turns(instruction, r.get("input"), r["output"], "")]
    instances = r["instances"]
    if not isinstance(instances, list) or not instances:
        what = "an empty list" if isinstance(instances, list) else f"a {type(instances).__name__}"
        raise ValueError(f"wrong type (instances is {what}); expected a non-empty list of {{input, output}} objects")
    out: list[list[Turn] | ValueError] = []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            out.append(ValueError(f"wrong type (instances[{k}] is a {type(inst).__name__}); "
                                  f"expected an {{input, output}} object"))
            continue
        try:
            out.append(_alpaca_turns(instruction, inst.get("input"), inst.get("output"), f"instances[{k}]."))
        except ValueError as e:
            out.append(e)
    return out


def _alpaca_turns(instruction: Any, inp: Any, output: Any, prefix: str) -> list[Turn]:
    """user = instruction (+ blank line + input when there is one), assistant = output."""
    user = _content(instruction, "instruction", "user")
    if not _is_missing(inp):
        if not isinstance(inp, (str, int, float)) or isinstance(inp, bool):
            raise ValueError(f"wrong type ({prefix}input is a {type(inp).__name__}); expected a string")
        if str(inp).strip():
            user = f"{user}\n\n{inp}"
    return [("user", user, "instruction"), ("assistant", output, f"{prefix}output")]


def _prompt_completion(r: dict) -> list[list[Turn]]:
    layout = "prompt and completion (strings, or lists of {role, content} messages)"
    prompt = _need(r, "prompt", "prompt_completion", layout)
    completion = _need(r, "completion", "prompt_completion", layout)
    turns = _message_list(prompt, "prompt", "role", "content") if isinstance(prompt, list) \
        else [("user", prompt, "prompt")]
    turns += _message_list(completion, "completion", "role", "content") if isinstance(completion, list) \
        else [("assistant", completion, "completion")]
    return [turns]


def _messages(r: dict) -> list[list[Turn]]:
    msgs = _need(r, "messages", "messages", "messages: a list of {role, content} objects")
    return [_message_list(msgs, "messages", "role", "content")]


def _sharegpt(r: dict) -> list[list[Turn]]:
    msgs = _need(r, "conversations", "sharegpt", "conversations: a list of {from, value} objects")
    return [_message_list(msgs, "conversations", "from", "value")]


def _message_list(msgs: Any, key: str, role_key: str, content_key: str) -> list[Turn]:
    if not isinstance(msgs, list):
        raise ValueError(f"wrong type ({key} is a {type(msgs).__name__}); expected a list of "
                         f"{{{role_key}, {content_key}}} objects")
    if not msgs:
        raise ValueError(f"empty conversation ({key} is an empty list); add the turns or remove the row")
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"wrong type ({key}[{k}] is a {type(m).__name__}); expected a "
                             f"{{{role_key}, {content_key}}} object")
        if role_key not in m:
            raise ValueError(f"missing role ({key}[{k}] has no {role_key!r}); every turn needs "
                             f"{role_key} and {content_key}")
        turns.append((m[role_key], m.get(content_key), f"{key}[{k}]"))
    return turns


_PARSERS = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "messages": _messages,
            "sharegpt": _sharegpt}
_ROLE_SETS = {"alpaca": (ROLES, "system, user or assistant"),
              "prompt_completion": (ROLES, "system, user or assistant"),
              "messages": (ROLES, "system, user or assistant"),
              "sharegpt": (SHAREGPT_ROLES, "human, user, gpt, assistant or system")}


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _content(value: Any, where: str, role: str) -> str:
    if _is_missing(value):
        raise ValueError(f"missing content ({where}, role {role}); every turn needs text")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"wrong type ({where} content is a {type(value).__name__}); expected a string")
    text = value if isinstance(value, str) else str(value)  # numbers in JSON answers are text to a chat model
    if not text.strip():
        if role == "assistant":
            raise ValueError(f"empty assistant turn ({where}); give the reply text or remove the turn")
        raise ValueError(f"empty content ({where}, role {role}); give the text or remove the turn")
    return text


def _validate(turns: list[Turn], role_map: dict[str, str], role_hint: str) -> list[dict[str, str]]:
    messages = []
    for raw_role, raw_content, where in turns:
        if not isinstance(raw_role, str):
            raise ValueError(f"wrong type ({where} role is a {type(raw_role).__name__}); expected one of {role_hint}")
        role = role_map.get(raw_role.strip().lower())
        if role is None:
            raise ValueError(f"unknown role {raw_role!r} ({where}); use {role_hint}")
        messages.append({"role": role, "content": _content(raw_content, where, role)})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("no assistant turn (nothing to learn from); add the assistant's reply")
    if roles[-1] != "assistant":
        raise ValueError(f"conversation does not end with an assistant turn (last turn is {roles[-1]}, "
                         f"{turns[-1][2]}); end it with the reply or drop the trailing turns")
    first = next(i for i, r in enumerate(roles) if r != "system")
    if roles[first] != "user":
        # Chat templates locate the reply after a user turn; many (Llama 2, Mistral, Gemma) raise otherwise.
        raise ValueError(f"assistant turn before any user turn ({turns[first][2]}); start with the user's message")
    return messages


# ------------------------------------------------------------------------------------ template + mask


class ChatRenderer:
    """A tokenizer plus the chat template resolved once (data.template file, the tokenizer's own, or ChatML)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template, self.name = resolve_template(tokenizer, template)
        self.end_markers = _end_markers(tokenizer)
        self.specials = tuple(t for t in _special_strings(tokenizer) if t)

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
        return bool(self.specials) and any(sp in m["content"] for m in messages for sp in self.specials)

    def tokenize_safe(self, messages: list[dict], text: str, *, add_generation_prompt: bool) -> tuple[list, list]:
        """Ids and offsets of `text` (the rendering of `messages`) in which message content is plain text."""
        if not self.forges(messages):
            (ids,), (offsets,) = self.tokenize([text])
            return ids, offsets
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
        return next(sp for m in messages for sp in self.specials if sp in m["content"])

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


# ---------------------------------------------------------------------------------------------- encode


def encode_conversations(tokenizer, convs: list[Conversation],
                         cfg: DataConfig) -> tuple[list[list[int]], list[list[int]], Counter]:
    """Token ids and loss masks for each kept conversation, with data.overlength applied at data.max_length.
    counts: "truncated", "dropped" (total), and "dropped: <why>" for each reason."""
    renderer = ChatRenderer(tokenizer, cfg.template)
    all_ids: list[list[int]] = []
    all_masks: list[list[int]] = []
    counts: Counter = Counter()

    def drop(why: str) -> None:
        counts["dropped"] += 1
        counts[f"dropped: {why}"] += 1

    rendered: list[tuple[Conversation, str, list]] = []
    cap = 64 * cfg.max_length  # characters of one message worth tokenizing: far past max_length tokens (batches.py)
    for conv in convs:
        if any(len(m["content"]) > cap for m in conv.messages):  # a 50 MB row: the kept tokens are the same
            conv = Conversation([m | {"content": m["content"][:cap]} for m in conv.messages], conv.line, conv.source)
        try:
            rendered.append((conv, *renderer.text_and_spans(conv.messages, cfg.train_on)))
        except ValueError as e:
            if not cfg.skip_invalid:
                raise DataError(f"{conv.source}:{conv.line}: {e} (or set data.skip_invalid=true to skip such "
                                f"rows)") from None
            drop(_kind(str(e)))
    for at in range(0, len(rendered), 256):  # batches: the Rust tokenizer uses its threads
        chunk = rendered[at: at + 256]
        batch_ids, batch_offsets = renderer.tokenize([text for _, text, _ in chunk])
        for k, (conv, text, _) in enumerate(chunk):  # text holding control-token strings: tokenized piece-wise
            if renderer.forges(conv.messages):
                try:
                    batch_ids[k], batch_offsets[k] = renderer.tokenize_safe(conv.messages, text,
                                                                            add_generation_prompt=False)
                except ValueError as e:
                    raise DataError(f"{conv.source}:{conv.line}: {e}") from None
        for (conv, _, spans), ids, offsets in zip(chunk, batch_ids, batch_offsets):
            mask = _loss_mask(offsets, spans, cfg.train_on)
            if not any(mask):
                drop("no loss tokens")
                continue
            n, limit = len(ids), cfg.max_length
            if n > limit:
                if cfg.overlength == "error":
                    raise DataError(f"{conv.source}:{conv.line}: {n} tokens > data.max_length={limit}; raise "
                                    f"max_length, or set data.overlength=truncate|drop")
                if cfg.overlength == "drop":
                    drop("longer than max_length")
                    continue
                ids, mask = ids[:limit], mask[:limit]
                if not any(mask):
                    drop("no loss tokens within max_length")
                    continue
                counts["truncated"] += 1
            all_ids.append(ids)
            all_masks.append(mask)
    return all_ids, all_masks, counts

"""Causal-LM (instruction / chat) data: rows -> conversations -> token ids + a 0/1 loss mask.

Rows in any of four layouts (alpaca incl. the seed-task `instances` layout, prompt/completion, chat `messages`,
ShareGPT `conversations`) become one list of {role, content} messages each, validated like `examples.py`:
the first bad row stops with file:line and a fix, or with `data.skip_invalid` it is skipped and counted.

The chat template, the loss mask and turn-forgery-safe tokenization are in `chat_template.py`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .chat_template import (CHATML, CHATML_END, TRAIN_ON, ChatRenderer, prompt_ids,  # noqa: F401  (re-exported)
                            render_and_mask, render_prompt, resolve_template)
from .chat_template import _loss_mask
from .read import Table

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LAYOUTS = ("instruction + output [+ input] (alpaca), instruction + instances (alpaca seed tasks), "
           "prompt + completion, messages [{role, content}], conversations [{from, value}] (sharegpt)")


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
                    batch_ids[k], batch_offsets[k] = renderer.tokenize_pieces(conv.messages, text,
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

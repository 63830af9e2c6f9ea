"""Batched text generation from rendered prompts: left padding, results in input order, stop strings cut.

The prompts are already rendered (a chat template added any special tokens), so they are tokenized with
`add_special_tokens=False`; chat prompts come as token ids (`ChatRenderer.prompt_ids`), so that message text is
never read as control tokens (data/chat.py). Only the newly generated text comes back, cut at the first EOS / end-of-turn token
and at the first stop string.

Generation is defined by the arguments alone. transformers 5.x fills every generation parameter left unset from
the model's own `generation_config` (a checkpoint's `generation_config.json`: `top_k=20`,
`repetition_penalty=1.05`, ...) and then from global defaults (`top_k=50` when sampling). Here the model's config
is swapped for one holding only the special-token ids for the duration of the call, and `top_k=0` is passed, so
greedy is plain argmax and sampling is plain temperature + top-p.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..errors import ConfigError, DataError

# Parameters kept from the model's generation config; everything else comes from `generate()`'s arguments.
_KEPT = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def generate(model, tokenizer, prompts: list[str] | list[list[int]], *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop: list[str] | None = None,
             batch_size: int = 16, device=None, bf16: bool = False, progress: bool = False) -> list[str]:
    """Generates a continuation of each prompt (rendered text, or its token ids); returns the new text only, in
    the order of `prompts`.

    Prompts are batched longest first (less padding) and left-padded, so every row's last prompt token sits in the
    last column and batched greedy output equals one-at-a-time greedy output. Sampling seeds `torch.manual_seed(seed
    + batch_index)` per batch inside a forked RNG (the caller's RNG state is untouched); a sample is reproducible for
    the same prompts, `batch_size` and `seed`. Inputs go to `device` (default: the model's device); the model is not
    moved. The tokenizer is not modified (padding is done here, to the left, with its pad token or else EOS).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and temperature <= 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")
    if do_sample and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if not prompts:
        return []
    stop = [s for s in (stop or []) if s]
    device = torch.device(device) if device is not None else _model_device(model)

    texts = [p for p in prompts if isinstance(p, str)]
    encoded_texts = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    encoded = [next(encoded_texts) if isinstance(p, str) else list(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {i} is empty after tokenization; generation needs at least one prompt token")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else None
    if pad_id is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    cut_ids = set(eos_ids) | {pad_id}

    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
                  pad_token_id=pad_id, eos_token_id=eos_ids or None)
    if do_sample:  # top_k=0: no top-k cut (transformers would default it to 50); sampling-only flags, else it warns
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop and _stop_strings_supported(tokenizer, stop):
        kwargs.update(stop_strings=stop, tokenizer=tokenizer)

    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # stable: ties keep input order
    out: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=do_sample)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr, disable=not progress)
    try:
        with rng, _bare_generation_config(model), torch.inference_mode(), autocast:
            for b, start in enumerate(range(0, len(order), batch_size)):
                idx = order[start:start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in idx], pad_id)
                if do_sample:
                    torch.manual_seed(seed + b)
                gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     **kwargs)
                new = gen[:, input_ids.shape[1]:].tolist()  # left padding: every prompt ends at the same column
                for i, ids in zip(idx, new):
                    out[i] = _finish(tokenizer, ids, cut_ids, stop)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS / end-of-turn ids: the model's generation config (an int or a list) plus the tokenizer's EOS."""
    cfg = getattr(_unwrap(model), "generation_config", None)
    ids = getattr(cfg, "eos_token_id", None)
    ids = [] if ids is None else [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask


def _finish(tokenizer, ids: list[int], cut_ids: set[int], stop: list[str]) -> str:
    """New token ids -> text: cut at the first EOS/pad, drop special tokens, cut at the first stop string."""
    for j, t in enumerate(ids):
        if t in cut_ids:
            ids = ids[:j]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return cut_at_stop(text, stop)


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((p for p in (text.find(s) for s in (stop or []) if s) if p >= 0), default=len(text))
    return text[:cut]


def _stop_strings_supported(tokenizer, stop: list[str]) -> bool:
    """Whether transformers' StopStringCriteria can index this tokenizer's vocab (it fails on some, e.g. word-level
    vocabs with an unknown token); if not, stop strings are still applied by cutting the decoded text."""
    try:
        from transformers.generation.stopping_criteria import StopStringCriteria

        StopStringCriteria(tokenizer=tokenizer, stop_strings=stop)  # cached by transformers, so generate() reuses it
        return True
    except Exception:  # noqa: BLE001 - any failure just means "post-process only"
        return False


def _unwrap(model):
    """The transformers model under DDP / PEFT wrappers (whose generation_config generate() reads)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@contextlib.contextmanager
def _bare_generation_config(model):
    """Temporarily replace the model's generation config by one with only the special-token ids, so checkpoint
    defaults (top_k, repetition_penalty, ...) cannot leak into generation."""
    inner = _unwrap(model)
    old = getattr(inner, "generation_config", None)
    if old is None:
        yield
        return
    kept = {k: getattr(old, k) for k in _KEPT if getattr(old, k, None) is not None}
    inner.generation_config = GenerationConfig(**kept)
    try:
        yield
    finally:
        inner.generation_config = old

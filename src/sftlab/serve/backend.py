"""The model behind the server: loading (export folder or run directory) and inference.

`Classifier.predict(items)` turns (text, text_pair) items into predictions; `Generator.generate(ids, ...)` continues
a tokenized prompt. Both run on the server's one inference thread (batcher.py), never on the event loop, so they
may block; `Generator.encode` and `Generator.render` are cheap enough to call from the loop.

What a folder can be:
  - `sftlab export` output (sftlab_export.json): hf / merged -> transformers here; onnx / int8 / peft ->
    `sftlab.export.runtime.load_exported` (imported only then);
  - a run directory or its best/ folder (sftlab.json) -> `sftlab.eval.evaluate.load_trained` (full, peft and
    bottleneck-adapter runs).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import StoppingCriteria

from ..artifacts import EXPORT_META, TASKS, ModelDir
from ..data.batches import padded_width
from ..errors import SftlabError
from ..precision import pad_multiple
from .errors import ApiError


# ------------------------------------------------------------------------------------------------ loading


def load_backend(path: str | Path, *, precision: str = "fp32", batch_tokens: int = 16_384,
                 threads: int | None = None):
    """A Classifier or a Generator for `path`; anything else raises SftlabError (one line, for the CLI).
    precision: fp32 | bf16 | auto (bf16 where measured faster than fp32) for classification passes; `threads`
    only sizes an onnxruntime session (torch's thread count is the app's to set, app.py)."""
    md = ModelDir.open(path)
    p = md.path
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16())
    if md.kind == "export":
        meta = _read_meta(p / EXPORT_META)
        fmt = meta.get("format")
        if fmt in ("hf", "merged"):
            return _from_hf_folder(p, meta, bf16=bf16, batch_tokens=batch_tokens)
        if fmt in ("onnx", "int8", "peft"):
            return _from_runtime(p, meta, threads=threads, bf16=bf16, batch_tokens=batch_tokens)
        raise SftlabError(f"{p / EXPORT_META}: unknown format {fmt!r}; expected hf, merged, peft, int8 or onnx")
    if md.trained:
        from ..eval.evaluate import load_trained

        meta = _read_meta(md.model_dir / "sftlab.json")
        model, tokenizer, _ = load_trained(p)
        return _wrap(model, tokenizer, meta, name=_name(p), fmt="run", bf16=bf16, batch_tokens=batch_tokens)
    if not p.exists():
        raise SftlabError(f"{path}: no such directory; give an `sftlab export` folder or a run directory")
    raise SftlabError(f"{path}: nothing to serve here (no {EXPORT_META}, no best/sftlab.json); give an "
                      f"`sftlab export` folder or a finished run directory")


def native_bf16() -> bool:
    """bf16 matmuls faster than fp32 here: CUDA with bf16, or a CPU where a probe measures them faster (AVX-512 BF16
    alone is not enough: a VM without AMX ran them at half the fp32 rate; src/sftlab/precision.py)."""
    from ..precision import bf16_faster

    return bf16_faster("cuda" if torch.cuda.is_available() else "cpu")


def _read_meta(file: Path) -> dict:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SftlabError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("task") not in TASKS:
        raise SftlabError(f"{file}: 'task' must be one of {', '.join(TASKS)}")
    if meta["task"] == "classification" and not (isinstance(meta.get("labels"), list) and meta["labels"]):
        raise SftlabError(f"{file}: a classification model needs its 'labels' (class names in id order)")
    return meta


def _name(p: Path) -> str:
    p = p.resolve()
    return p.parent.name if p.name == "best" else p.name


def _from_hf_folder(p: Path, meta: dict, **kw):
    from transformers import AutoTokenizer

    from ..models import load as _quiet_loads  # noqa: F401  (no transformers progress bars)

    from ..tasks import task_spec

    auto = task_spec(meta["task"]).auto_model()
    from ..eval.evaluate import loading

    with loading(p):  # truncated or corrupt files: one line, not a safetensors traceback
        model = auto.from_pretrained(p)
        if meta["task"] == "multitask":
            from ..eval.evaluate import _heads
            from ..models.multihead import install_heads

            install_heads(model, _heads(meta), p)
        elif meta["task"] in ("classification", "regression"):  # mean pooling, as config.json says
            from ..models.pooling import apply_pooling

            apply_pooling(model)
        tokenizer = AutoTokenizer.from_pretrained(p)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return _wrap(model, tokenizer, meta, name=_name(p), fmt=meta["format"], **kw)


def _from_runtime(p: Path, meta: dict, *, threads: int | None = None, **kw):
    try:
        from ..export.runtime import load_exported
    except ImportError as e:
        raise SftlabError(f"{p}: format {meta['format']!r} needs sftlab.export.runtime ({e})") from None
    exported = load_exported(p, threads=threads)
    model = getattr(exported, "model", None)
    if isinstance(model, torch.nn.Module):  # peft (and decoders): the torch model, batched and autocast here
        return _wrap(model, exported.tokenizer, meta, name=_name(p), fmt=meta["format"], **kw)
    if hasattr(exported, "logits"):  # onnx / int8: the runtime's own logits over texts (it sorts and batches)
        if meta["task"] == "multitask":
            return MultiClassifier(exported.logits, None, meta, name=_name(p), fmt=meta["format"])
        return Classifier(exported.logits, getattr(exported, "meta", meta), name=_name(p), fmt=meta["format"])
    raise SftlabError(f"{p}: load_exported returned neither .logits nor a torch .model; cannot serve it")


def _wrap(model, tokenizer, meta, *, name, fmt, bf16=False, batch_tokens=16_384):
    if meta["task"] == "causal_lm":
        return Generator(model, tokenizer, meta, name=name, fmt=fmt)
    logits = TorchLogits(model, tokenizer, meta.get("max_length") or 512, bf16=bf16, batch_tokens=batch_tokens)
    if meta["task"] == "multitask":
        return MultiClassifier(logits, model, meta, name=name, fmt=fmt)
    return Classifier(logits, meta, name=name, fmt=fmt)


# ------------------------------------------------------------------------------------------ classification


# A forward pass may spend at most this many padded tokens per real token. Measured on MiniLM-L6 + SST-2 dev,
# 32 random sentences a micro-batch, bf16, 1 thread: one padded pass 7.5-9.0 ms CPU per text; chunks of similar
# length (1.25) 5.3-5.8; 1.1 (too many small passes) 6.4-6.7; 1.5 5.6-6.3 (docs/serve.md).
PADDING_SLACK = 1.25


class TorchLogits:
    """texts (+ pairs) -> logits [N, C] float32 in input order. Tokenized exactly as training/eval did
    (`truncation=True, max_length`), sorted by length and cut into forward passes of similar length (at most
    PADDING_SLACK padded tokens per real token, at most `batch_tokens` padded tokens), so short texts are not
    padded to a long one's length."""

    def __init__(self, model, tokenizer, max_length: int, *, bf16: bool = False, batch_tokens: int = 16_384):
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)
        self.batch_tokens = batch_tokens
        self.device = next(model.parameters()).device
        self.bf16 = bf16
        self.pad_id = tokenizer.pad_token_id or 0
        # bf16 on a CPU: widths in steps of 3, as training does (precision.pad_multiple): oneDNN keeps kernels per
        # matmul shape. 400 calls of 1-16 random texts: RSS +433 -> +210 MB, 17.2 -> 15.3 s (fewer kernel builds).
        self.multiple = pad_multiple("auto", bf16, self.device)
        # Exact: the last block runs for [CLS] only where the head reads nothing else (verified by a probe at
        # load, else left as is): ~14% fewer FLOPs per text on a 6-block model (sftlab/models/first_token.py).
        from ..models.first_token import enable_first_token_last_layer
        from ..models.pooling import pooling_of

        if pooling_of(model) == "first":  # (a mean-pooling head reads every position)
            enable_first_token_last_layer(model)
        if bf16 and not hasattr(model, "peft_config"):
            # Autocast casts every Linear's fp32 weight to bf16 on every forward pass; casting them once gives the
            # same bf16 values (bit-identical outputs, measured) without that work: -6% CPU per text. LayerNorm,
            # embeddings and softmax stay fp32, as autocast runs them. (peft models are left as they are.)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, verbose=False)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        out: np.ndarray | None = None
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            for chunk in self.chunks([len(x) for x in ids]):
                logits = self.model(**self._collate(chunk, ids, types)).logits.float().cpu().numpy()
                if out is None:
                    out = np.empty((len(ids), logits.shape[1]), dtype=np.float32)
                out[chunk] = logits
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def chunks(self, lengths: list[int]) -> list[list[int]]:
        """Indices longest first, cut where padding would pass PADDING_SLACK or the pass `batch_tokens`."""
        out: list[list[int]] = []
        chunk, real = [], 0
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            if chunk:
                padded = lengths[chunk[0]] * (len(chunk) + 1)
                if padded > PADDING_SLACK * (real + lengths[i]) or padded > self.batch_tokens:
                    out.append(chunk)
                    chunk, real = [], 0
            chunk.append(i)
            real += lengths[i]
        return out + ([chunk] if chunk else [])

    def _collate(self, chunk, ids, types) -> dict:
        width = padded_width(len(ids[chunk[0]]), self.multiple)  # longest first
        x = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        t = torch.zeros((len(chunk), width), dtype=torch.long) if types is not None else None
        for r, i in enumerate(chunk):
            n = len(ids[i])
            x[r, :n] = torch.tensor(ids[i])
            mask[r, :n] = 1
            if t is not None:
                t[r, :n] = torch.tensor(types[i])
        batch = {"input_ids": x, "attention_mask": mask} | ({"token_type_ids": t} if t is not None else {})
        return {k: v.to(self.device) for k, v in batch.items()}


class Classifier:
    """Classification or regression behind a logits function (torch model, or an exported runtime's `.logits`)."""

    kind = "classify"

    def __init__(self, logits_fn: Callable, meta: dict, *, name: str = "model", fmt: str = "hf"):
        self.logits_fn, self.meta, self.name, self.format = logits_fn, meta, name, fmt
        self.task = meta["task"]
        self.labels = [str(x) for x in meta["labels"]] if self.task == "classification" else None

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> tuple[list, list[float]]:
        """(labels, scores): the top class and its softmax probability; regression: (None..., values)."""
        preds = self._predict(texts, pairs)
        return [p["label"] for p in preds], [p["score"] for p in preds]

    def predict(self, items: list[tuple[str, str | None]]) -> list[dict]:
        """One dict per (text, text_pair or None) item, in order: {"label", "score", "scores"}. Items with and
        without a pair may be mixed (they run as two groups)."""
        out: list[dict | None] = [None] * len(items)
        for has_pair in (False, True):
            idx = [i for i, (_, b) in enumerate(items) if (b is not None) == has_pair]
            if idx:
                preds = self._predict([items[i][0] for i in idx], [items[i][1] for i in idx] if has_pair else None)
                for i, p in zip(idx, preds):
                    out[i] = p
        return out  # type: ignore[return-value]

    def _predict(self, texts, pairs) -> list[dict]:
        logits = np.asarray(self.logits_fn(texts, pairs), dtype=np.float32)
        if self.task == "regression":
            return [{"label": None, "score": float(row[0])} for row in logits]
        probs = torch.softmax(torch.from_numpy(logits), -1).numpy()  # as `sftlab predict` computes it
        if probs.shape[1] != len(self.labels):
            raise RuntimeError(f"model has {probs.shape[1]} outputs but {len(self.labels)} labels")
        top = probs.argmax(-1)
        return [{"label": self.labels[k], "score": float(p[k]), "scores": dict(zip(self.labels, map(float, p)))}
                for k, p in zip(top, probs)]


class MultiClassifier:
    """A multitask model: one Classifier per task over the shared model, each routing to its head. `predict` takes
    (text, text_pair, task) items and runs each task's items as their own forward passes (a batch of requests of
    several tasks becomes one group per task)."""

    kind, task = "classify", "multitask"

    def __init__(self, logits: Callable, model, meta: dict, *, name: str = "model", fmt: str = "hf"):
        """`logits(texts, pairs)`: a TorchLogits over `model` (a head is chosen per call by its switch), or, with
        `model` None, an exported runtime's `.logits`, which takes task=NAME (every head in one graph)."""
        from ..models.multihead import active_head
        from ..tasks.multitask import Head

        self.meta, self.name, self.format = meta, name, fmt
        self.heads = [Head.from_json(h) for h in meta["labels"]]

        def on_head(k, head_name):
            def fn(texts, pairs=None):
                if model is None:
                    return logits(texts, pairs, task=head_name)
                with active_head(model, k):  # (one inference thread: no other call sees the switch turned)
                    return logits(texts, pairs)
            return fn

        self.tasks = {h.name: Classifier(on_head(k, h.name), {"task": h.kind, "labels": h.labels}, name=name,
                                         fmt=fmt) for k, h in enumerate(self.heads)}

    def describe(self) -> list[dict]:
        return [{"name": h.name, "task": h.kind, "labels": h.labels} for h in self.heads]

    def predict(self, items: list[tuple]) -> list[dict]:
        out: list[dict | None] = [None] * len(items)
        for task in dict.fromkeys(it[2] for it in items):
            idx = [i for i, it in enumerate(items) if it[2] == task]
            for i, p in zip(idx, self.tasks[task].predict([items[i][:2] for i in idx])):
                out[i] = p
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop (EOS or a stop string) | length | timeout | cancelled
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0  # on the inference thread


class Generator:
    """A causal LM: chat rendering (the run's template and system prompt), prompt encoding with a context check,
    and one generation at a time with a per-step watch for stop strings, cancellation and the deadline."""

    kind = "generate"

    def __init__(self, model, tokenizer, meta: dict, *, name: str = "model", fmt: str = "hf"):
        from ..data.chat import ChatRenderer
        from ..eval.generate import _eos_ids

        self.model, self.tokenizer, self.meta, self.name, self.format = model, tokenizer, meta, name, fmt
        self.task, self.labels = "causal_lm", None
        self.renderer = ChatRenderer(tokenizer, meta.get("template"))
        self.system_prompt = meta.get("system_prompt")
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [None])[0]
        self.pad_id = pad
        self.cut_ids = set(self.eos_ids) | ({pad} if pad is not None else set())
        cfg = getattr(model, "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.device = next(model.parameters()).device

    def render(self, messages: list[dict]) -> str:
        """The prompt text for a conversation (system prompt of the run added when the request has none)."""
        return self._with_system(messages)[1]

    def _with_system(self, messages: list[dict]) -> tuple[list[dict], str]:
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        try:
            return messages, self.renderer.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(422, f"messages: {e}") from None

    def encode(self, prompt: str | list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of a conversation (rendered with the template; message text never becomes control tokens, so
        a user cannot forge turns) or of a raw prompt text (also read as plain text); 400 when empty or when it
        plus max_new_tokens exceed the context."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            messages, text = self._with_system(prompt)
            try:
                ids = self.renderer.tokenize_safe(messages, text, add_generation_prompt=True)[0]
            except ValueError as e:
                raise ApiError(422, f"messages: {e}") from None
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization; give some text")
        if self.context and len(ids) + max_new_tokens > self.context:
            raise ApiError(400, f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                                f"model's context of {self.context} tokens; shorten the prompt or ask for fewer tokens")
        return list(ids)

    def generate(self, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None, cancel: threading.Event | None = None,
                 deadline: float = float("inf"), on_text: Callable[[str], None] | None = None) -> Generation:
        """Continues `ids`. temperature 0 = greedy. `on_text` receives the new text piece by piece (never past a
        stop string, never half a character). Stops early on `cancel` or at `deadline` (time.monotonic())."""
        from transformers import GenerationConfig, StoppingCriteriaList

        from ..eval.generate import _bare_generation_config

        cancel = cancel or threading.Event()
        if cancel.is_set() or time.monotonic() > deadline:  # dropped while queued: never started
            return Generation("", "cancelled" if cancel.is_set() else "timeout", len(ids), 0)
        t0 = time.perf_counter()
        watch = _Watch(self, len(ids), [s for s in (stop or []) if s], cancel, deadline, on_text)
        sample = temperature > 0
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                               pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                               **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}))
        rng = torch.random.fork_rng(devices=[], enabled=seed is not None)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with rng, _bare_generation_config(self.model), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg,
                                      stopping_criteria=StoppingCriteriaList([watch]))
        new = out[0, len(ids):].tolist()
        text, hit_stop, hit_eos = watch.decode(new)
        watch.flush(text)
        reason = watch.reason or ("stop" if hit_stop or hit_eos else "length" if len(new) >= max_new_tokens
                                  else "stop")
        return Generation(text, reason, len(ids), len(new), time.perf_counter() - t0)


class _Watch(StoppingCriteria):
    """A stopping criterion run after every new token: decodes the new tokens, stops at a stop string, on
    cancellation (client gone, time limit) or past the deadline, and streams the text that is safe to show."""

    def __init__(self, gen: Generator, prompt_len: int, stop: list[str], cancel: threading.Event, deadline: float,
                 on_text):
        self.gen, self.prompt_len, self.stop = gen, prompt_len, stop
        self.cancel, self.deadline, self.on_text = cancel, deadline, on_text
        self.sent = 0
        self.reason: str | None = None

    def decode(self, new: list[int]) -> tuple[str, bool, bool]:
        """(text cut at the first EOS/pad and the first stop string, a stop string was hit, EOS was hit)"""
        eos = False
        for j, t in enumerate(new):
            if t in self.gen.cut_ids:
                new, eos = new[:j], True
                break
        text = self.gen.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((p for p in (text.find(s) for s in self.stop) if p >= 0), default=-1)
        return (text[:cut], True, eos) if cut >= 0 else (text, False, eos)

    def __call__(self, input_ids, scores, **kwargs):
        text, hit_stop, _ = self.decode(input_ids[0, self.prompt_len:].tolist())
        if self.on_text is not None and not hit_stop:
            safe = text.rstrip("\ufffd")  # a multi-byte character still incomplete
            for s in self.stop:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(s) - 1, len(safe)), 0, -1):
                    if safe.endswith(s[:k]):
                        safe = safe[:-k]
                        break
            self._send(safe)
        if time.monotonic() > self.deadline:
            self.reason = "timeout"
        elif self.cancel.is_set():
            self.reason = "cancelled"
        done = hit_stop or self.reason is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def flush(self, text: str) -> None:
        if self.on_text is not None and self.reason is None:
            self._send(text)

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

"""The distillation teacher's logits, computed once at inference speed and cached on disk by content.

`teacher_logits(spec, texts, pairs, labels=..., max_length=...)` -> float32 [rows, classes] in input order. The
teacher is a run directory (its best/), an `sftlab export` folder of any format, or an HF folder whose config names
its classes; it tokenizes the text its own way, so logit KD works across tokenizers and architectures.

Cache: `$SFTLAB_CACHE/teacher-logits/<key>.safetensors`, key = sha256 of (the teacher's fingerprint, max_length,
the texts and pairs). The fingerprint hashes the teacher's weight files and its meta, so a retrained teacher never
reuses old logits; the same teacher on the same data reuses them across epochs, runs and resumes (built once, written
atomically). The pass runs under no_grad in large length-sorted batches, bf16 autocast where this machine's bf16 is
measured faster (precision.py), with a progress bar.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.packaged import cache_root, file_sha256

WEIGHTS = ("model.safetensors", "model.onnx", "adapter_model.safetensors", "adapters.safetensors")
META = ("sftlab.json", "sftlab_export.json", "config.json")
CHUNK = 2048  # rows per progress update


def model_folder(spec: str | Path) -> Path:
    """The folder holding the teacher's weights: RUN_DIR/best, an export folder, an HF folder, or a packaged
    model's folder (by name)."""
    p = Path(spec)
    if not p.exists() and "/" not in str(spec):
        from ..models.load import PACKAGED
        from ..models.packaged import PACKAGED_DECODERS
        from ..models.zipped import PACKAGED_ZIPS

        if str(spec) in {**PACKAGED, **PACKAGED_DECODERS, **PACKAGED_ZIPS}:
            from ..models import resolve_model

            p = Path(resolve_model(str(spec)))
    for cand in (p / "best", p):
        if any((cand / w).is_file() for w in WEIGHTS) and any((cand / m).is_file() for m in META):
            return cand
    raise ConfigError(f"objective.teacher: {spec} holds no trained model (a run directory, its best/, an `sftlab "
                      f"export` folder or an HF folder); train or export the teacher first")


def fingerprint(spec: str | Path) -> str:
    """sha256 over the teacher's weight files (hashes memoized per process) and its meta files."""
    folder = model_folder(spec)
    h = hashlib.sha256()
    for name in WEIGHTS + META:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            h.update((file_sha256(f) if name in WEIGHTS else f.read_bytes().hex()).encode())
    return h.hexdigest()


def _open(spec: str | Path):
    from ..artifacts import ModelDir
    from ..export.runtime import TorchExported, load_exported

    folder = model_folder(spec)
    if ModelDir.open(folder).kind != "base":  # a run's model or an export: sftlab's own loader
        return load_exported(folder)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..eval.evaluate import loading
    from ..export.runtime import DecoderExported

    with loading(folder):
        arch = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
        decoder = arch.endswith("ForCausalLM")
        model = (AutoModelForCausalLM if decoder else AutoModelForSequenceClassification).from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if decoder:
        return DecoderExported({"task": "causal_lm", "format": "hf"}, tokenizer, model)
    from ..models.pooling import apply_pooling

    apply_pooling(model)  # an HF folder saved with mean pooling (models/pooling.py)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return TorchExported({"task": "classification", "labels": names, "format": "hf"}, tokenizer, model)


def teacher_logits(spec: str | Path, texts: list[str], pairs: list[str] | None, *, labels: list[str] | None,
                   max_length: int, batch_size: int = 64, progress: bool = True, cache: bool = True) -> np.ndarray:
    """The teacher's logits for these rows (cached unless `cache` is false); refuses a teacher whose label set
    differs from `labels`."""
    file = _cache_file("teacher-logits", fingerprint(spec), max_length, texts, pairs)
    if cache and file.is_file():  # made for this teacher, these rows and max_length; its label set was checked then
        with safe_open(str(file), "np") as f:
            made_for = json.loads(f.metadata().get("labels", "null"))
        _same_labels(spec, made_for, labels)
        return load_file(str(file))["logits"].numpy()
    teacher = _open(spec)
    if teacher.task == "causal_lm":
        raise ConfigError(f"objective.teacher: {spec} is a decoder; logit distillation of a "
                          f"{'classifier' if labels else 'regressor'} needs a teacher of the same task")
    _same_labels(spec, teacher.labels, labels)
    teacher.max_length, teacher.batch_size = max_length, batch_size
    out = np.empty((len(texts), 1 if labels is None else len(labels)), np.float32)
    t0 = time.perf_counter()
    with _autocast(teacher), tqdm(total=len(texts), desc="teacher logits", unit="row", file=sys.stderr,
                                  disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), CHUNK):
            end = min(start + CHUNK, len(texts))
            out[start:end] = teacher.logits(texts[start:end], pairs[start:end] if pairs is not None else None)
            bar.update(end - start)
    seconds = time.perf_counter() - t0
    if progress:
        print(f"teacher logits: {len(texts)} rows in {seconds:.1f}s ({len(texts) / max(seconds, 1e-9):.1f} rows/s)"
              + (f", cached in {file}" if cache else ""), file=sys.stderr)
    if cache:
        _store(file, {"logits": torch.from_numpy(out)}, {"teacher": str(spec), "labels": json.dumps(labels),
                                                           "rows": str(len(texts)), "max_length": str(max_length)})
    return out


def _cache_file(kind: str, *key) -> Path:
    """`$SFTLAB_CACHE/<kind>/<sha256 of the key>.safetensors`: content-addressed, shared by runs and processes."""
    digest = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
    return cache_root() / kind / f"{digest[:32]}.safetensors"


def _store(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Written whole or not at all (a per-process temporary renamed into place): concurrent writers are harmless."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, file)


def _same_labels(spec, teacher: list[str] | None, student: list[str] | None) -> None:
    if list(teacher or []) != list(student or []):
        raise ConfigError(f"objective.teacher: {spec} predicts labels {teacher} but the student's are {student}; "
                          f"distil between models of the same label set (same names, same order)")


def _autocast(teacher):
    from ..precision import resolve

    model = getattr(teacher, "model", None)
    if not isinstance(model, torch.nn.Module):
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16) if resolve("auto", device) else contextlib.nullcontext()


def teacher_topk(spec: str | Path, data, tokenizer, *, k: int, temperature: float, pad_id: int,
                 batch_size: int = 8, progress: bool = True, cache: bool = True) -> dict[str, torch.Tensor]:
    """Token-level targets for a decoder student: the teacher's k largest next-token logits at every loss position
    of every training row (`data`: the student's LMEncoded rows, packed or not; the teacher reads the same ids, so
    it must share the student's vocabulary). Returns {"values": [P, k] float32, "ids": [P, k] int64, "offsets":
    [rows + 1]}: row i's positions are offsets[i]:offsets[i+1], in the order the loss positions appear."""
    from ..data.lm import collate_lm
    from ..tasks.causal_lm import causal_lm_loss

    file = _cache_file("teacher-topk", fingerprint(spec), k, temperature, data.input_ids, data.labels,
                       data.position_ids)
    if cache and file.is_file():
        return load_file(str(file))
    teacher = _open(spec)
    if teacher.task != "causal_lm":
        raise ConfigError(f"objective.teacher: {spec} is a {teacher.task} model; token-level distillation of a "
                          f"decoder needs a causal_lm teacher")
    if teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"objective.teacher: {spec} has another vocabulary than the student; token-level "
                          f"distillation compares next-token distributions, so both need the same tokenizer")
    model = teacher.model
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: -len(data.input_ids[i]))
    per_row: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(data)
    t0 = time.perf_counter()
    with torch.inference_mode(), _autocast(teacher), tqdm(total=len(data), desc="teacher top-k", unit="row",
                                                          file=sys.stderr, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            batch = {name: v.to(device) for name, v in collate_lm(data, idx, pad_id).items()}
            _, logits = causal_lm_loss(model, batch)
            logits = logits.float()
            top = logits.topk(min(k, logits.shape[-1]), dim=-1)
            lse = (logits / temperature).logsumexp(-1)
            counts = (batch["labels"] != -100).sum(1).tolist()
            for i, v, t, z in zip(idx, top.values.split(counts), top.indices.split(counts), lse.split(counts)):
                per_row[i] = (v.cpu(), t.cpu(), z.cpu())
            bar.update(len(idx))
    sizes = [len(r[0]) for r in per_row]
    out = {"values": torch.cat([r[0] for r in per_row]), "ids": torch.cat([r[1] for r in per_row]),
           "lse": torch.cat([r[2] for r in per_row]),
           "offsets": torch.tensor([0] + [int(x) for x in np.cumsum(sizes)], dtype=torch.long)}
    if progress:
        print(f"teacher top-{k}: {len(data)} rows, {sum(sizes)} loss positions in "
              f"{time.perf_counter() - t0:.1f}s" + (f", cached in {file}" if cache else ""), file=sys.stderr)
    if cache:
        _store(file, out, {"teacher": str(spec), "k": str(k)})
    return out

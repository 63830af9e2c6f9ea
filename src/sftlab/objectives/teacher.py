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
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.packaged import cache_root, file_sha256

WEIGHTS = ("model.safetensors", "model.onnx", "adapter_model.safetensors", "adapters.safetensors")
META = ("sftlab.json", "sftlab_export.json", "config.json")
CHUNK = 2048  # rows per progress update


def model_folder(spec: str | Path) -> Path:
    """The folder holding the teacher's weights: RUN_DIR/best, an export folder, or an HF folder."""
    p = Path(spec)
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
    from ..export.runtime import TorchExported, load_exported, read_export_meta

    folder = model_folder(spec)
    if (folder / "sftlab.json").is_file() or read_export_meta(folder) is not None:
        return load_exported(folder)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..eval.evaluate import loading

    with loading(folder):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return TorchExported({"task": "classification", "labels": names, "format": "hf"}, tokenizer, model)


def teacher_logits(spec: str | Path, texts: list[str], pairs: list[str] | None, *, labels: list[str] | None,
                   max_length: int, batch_size: int = 64, progress: bool = True, cache: bool = True) -> np.ndarray:
    """The teacher's logits for these rows (cached unless `cache` is false); refuses a teacher whose label set
    differs from `labels`."""
    key_src = json.dumps([fingerprint(spec), max_length, texts, pairs], ensure_ascii=False)
    key = hashlib.sha256(key_src.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    file = cache_root() / "teacher-logits" / f"{key}.safetensors"
    if cache and file.is_file():  # made for this teacher, these rows and max_length; its label set was checked then
        with safe_open(str(file), "np") as f:
            made_for = json.loads(f.metadata().get("labels", "null"))
        _same_labels(spec, made_for, labels)
        return load_file(str(file))["logits"]
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
    if not cache:
        return out
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    save_file({"logits": out}, str(tmp), metadata={"teacher": str(spec), "labels": json.dumps(labels),
                                                     "rows": str(len(texts)), "max_length": str(max_length)})
    os.replace(tmp, file)
    return out


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

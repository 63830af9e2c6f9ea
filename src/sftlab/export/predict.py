"""`sftlab predict EXPORT_DIR --data FILE`: offline batch inference on any export folder, rows as `predict RUN_DIR`
writes them (line, text[, text_pair], label, score, scores | prediction), with a progress bar on stderr."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ExportError

CHUNK = 512  # rows per logits call: the bar moves, memory stays flat


def _view(exported, folder, task: str | None, columns: dict | None):
    """(logits function, task kind, labels, data config) of an export, or of one task of a multitask export."""
    from ..config import DataConfig

    meta = exported.meta
    layout = meta.get("columns") or {}
    logits, kind, labels = exported.logits, meta["task"], meta.get("labels")
    if kind == "multitask":
        names = [h.name for h in exported.heads]
        if task not in names:
            what = f"has no task {task!r}" if task is not None else "is a multitask export"
            raise ExportError(f"{folder} {what}; pass --task with one of: {', '.join(names)}")
        head = exported.heads[names.index(task)]
        layout = (meta.get("task_columns") or {}).get(task, layout)
        logits, kind, labels = (lambda t, p: exported.logits(t, p, task=task)), head.kind, head.labels
    elif task is not None:
        raise ExportError(f"--task {task}: {folder} is a single-task export ({kind}); drop --task")
    layout = {k: v for k, v in layout.items() if v is not None}
    return logits, kind, labels, DataConfig(**(layout | {k: v for k, v in (columns or {}).items() if v is not None}))


def predict_rows(folder: str | Path, data: str, *, batch_size: int = 32, columns: dict | None = None,
                 progress: bool = True, task: str | None = None):
    """Yields one dict per input row, in input order. Columns: the training layout (from the export's meta)
    unless overridden."""
    from ..data.examples import LabelMap, load_split
    from .runtime import load_exported

    exported = load_exported(folder)
    meta = exported.meta
    if meta["task"] == "causal_lm":
        raise ExportError(f"{folder}: a decoder; predict scores classifiers and regressors; use "
                          f"`sftlab generate {folder} --prompt ...` or `sftlab eval {folder} --data FILE`")
    exported.batch_size = batch_size
    logits_fn, kind, labels, dcfg = _view(exported, folder, task, columns)
    split, _ = load_split(dcfg, data, kind, LabelMap(labels) if labels else None, need_label=False)
    examples = split.examples
    with tqdm(total=len(examples), desc="predict", unit="row", disable=not progress, leave=False) as bar:
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start : start + CHUNK]
            pairs = [e.text_pair for e in chunk] if chunk[0].text_pair is not None else None
            logits = logits_fn([e.text for e in chunk], pairs)
            for ex, row in zip(chunk, logits):
                yield _row(ex, row, kind, labels)
            bar.update(len(chunk))


def evaluate_export(folder: str | Path, data: str, *, batch_size: int = 32, columns: dict | None = None,
                    task: str | None = None) -> dict:
    """`sftlab eval EXPORT_DIR --data FILE`: the metrics `sftlab eval RUN_DIR` gives, computed from the export's own
    logits (onnx / int8 / hf / merged / peft), so an export is judged as it will serve."""
    from ..data.examples import LabelMap, load_split
    from ..eval.metrics import compute_metrics
    from .runtime import load_exported

    exported = load_exported(folder)
    meta = exported.meta
    exported.batch_size = batch_size
    logits_fn, kind, labels, dcfg = _view(exported, folder, task, columns)
    split, _ = load_split(dcfg, data, kind, LabelMap(labels) if labels else None)
    examples = split.examples
    parts = []
    with tqdm(total=len(examples), desc="eval", unit="row", leave=False) as bar:
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start: start + CHUNK]
            pairs = [e.text_pair for e in chunk] if chunk[0].text_pair is not None else None
            parts.append(np.asarray(logits_fn([e.text for e in chunk], pairs), dtype=np.float32))
            bar.update(len(chunk))
    logits = np.concatenate(parts)
    y = np.array([e.label for e in examples])
    if kind == "regression":
        loss = float(np.mean((logits[:, 0] - y) ** 2))
    else:
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        loss = float(-logp[np.arange(len(y)), y.astype(int)].mean())
    return compute_metrics(kind, logits, y) | {"loss": loss, "examples": len(examples),
                                                       "skipped": sum(split.skipped.values()),
                                                       "format": meta.get("format")}


def _row(ex, logits: np.ndarray, task: str, labels: list[str] | None) -> dict:
    out = {"line": ex.line, "text": ex.text}
    if ex.text_pair is not None:
        out["text_pair"] = ex.text_pair
    if task == "regression":
        out["prediction"] = float(logits[0])
        return out
    z = np.exp(logits - logits.max())
    probs = z / z.sum()
    k = int(probs.argmax())
    return out | {"label": labels[k], "score": float(probs[k]),
                  "scores": {n: float(p) for n, p in zip(labels, probs)}}

"""Error analysis of a classifier or regressor on labelled data: what it gets wrong, where, and how sure it was.

Written by `sftlab eval` as RUN_DIR/analysis/<data>.json and read by `sftlab report`. Calibration follows
Guo et al. 2017: expected calibration error over equal-width confidence bins (15), and the per-bin accuracy
and confidence that a reliability diagram plots.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .metrics import compute_metrics

LENGTH_EDGES = (0, 16, 32, 64, 128, 256, 512)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def calibration(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            acc, c = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - c)
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(m.sum()),
                         "accuracy": acc, "confidence": c})
    return {"ece": float(ece), "bins": rows}


def length_buckets(task: str, logits: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> list[dict]:
    out = []
    edges = [e for e in LENGTH_EDGES if e < lengths.max(initial=0)] + [int(lengths.max(initial=0)) + 1]
    for lo, hi in zip(edges, edges[1:]):
        m = (lengths >= lo) & (lengths < hi)
        if m.any():
            with warnings.catch_warnings():  # a bucket may hold one class only; its MCC is then 0 by definition
                warnings.simplefilter("ignore")
                scores = compute_metrics(task, logits[m], labels[m])
            out.append({"tokens": f"{lo}-{hi - 1}", "count": int(m.sum()),
                        **scores})
    return out


def analyse(task: str, logits: np.ndarray, labels: np.ndarray, texts: list[str], lengths: list[int],
            label_names: list[str] | None = None, top_n: int = 20) -> dict:
    """Everything `sftlab report` shows about one model on one labelled file."""
    lengths_a = np.asarray(lengths)
    result = {"task": task, "examples": int(len(labels)), "metrics": compute_metrics(task, logits, labels),
              "by_length": length_buckets(task, logits, labels, lengths_a)}
    if task == "regression":
        pred = logits.reshape(-1)
        err = np.abs(pred - labels)
        worst = np.argsort(-err)[:top_n]
        result["worst"] = [{"text": texts[i], "target": float(labels[i]), "prediction": float(pred[i]),
                            "abs_error": float(err[i])} for i in worst]
        return result
    probs = softmax(logits.astype(np.float64))
    pred, conf = probs.argmax(-1), probs.max(-1)
    correct = pred == labels
    names = label_names or [str(i) for i in range(logits.shape[1])]
    ids = list(range(len(names)))
    p, r, f, support = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    result["per_class"] = [{"label": n, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i])} for i, n in enumerate(names)]
    result["confusion"] = {"labels": names, "matrix": confusion_matrix(labels, pred, labels=ids).tolist()}
    result["calibration"] = calibration(conf, correct)
    wrong = np.flatnonzero(~correct)
    worst = wrong[np.argsort(-conf[wrong], kind="stable")][:top_n]
    result["worst"] = [{"text": texts[i], "label": names[labels[i]], "predicted": names[pred[i]],
                        "confidence": float(conf[i])} for i in worst]
    return result

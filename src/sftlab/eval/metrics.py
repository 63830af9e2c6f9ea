"""Task metrics: accuracy, macro-F1, MCC for classes; Pearson, Spearman, MSE for regression.

Computed here with numpy, not scikit-learn/scipy: this module runs inside every training process, and importing
sklearn.metrics + scipy.stats costs ~100 MB of resident memory there (measured: 380 -> 482 MB after transformers),
a fifth of the gap to the memory goal of the performance issue. tests/unit/test_metrics.py checks every value
against sklearn/scipy (same definitions: sklearn's macro-F1 over the labels present in truth or prediction with
zero_division=0; multiclass MCC from the confusion matrix, Gorodkin 2004; Spearman with average ranks for ties).
"""
from __future__ import annotations

import numpy as np

# Metrics where lower is better; all others are maximised.
LOWER_IS_BETTER = {"loss", "mse", "perplexity"}


def compute_metrics(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task == "regression":
        pred = np.asarray(logits, dtype=np.float64).reshape(-1)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        constant = np.allclose(pred, pred[0]) or np.allclose(y, y[0])
        return {
            "pearson": 0.0 if constant else _pearson(pred, y),
            "spearman": 0.0 if constant else _pearson(_average_ranks(pred), _average_ranks(y)),
            "mse": float(np.mean((pred - y) ** 2)),
        }
    pred = np.asarray(logits).argmax(-1)
    y = np.asarray(labels).reshape(-1)
    classes, inverse = np.unique(np.concatenate([y, pred]), return_inverse=True)
    t, p = inverse[: len(y)], inverse[len(y):]
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return {"accuracy": float(np.trace(cm) / max(len(y), 1)), "macro_f1": _macro_f1(cm), "mcc": _mcc(cm)}


def _macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def _mcc(cm: np.ndarray) -> float:
    cm = cm.astype(np.float64)
    t_sum, p_sum, n = cm.sum(1), cm.sum(0), cm.sum()
    cov_ytyp = np.trace(cm) * n - t_sum @ p_sum
    cov_ypyp, cov_ytyt = n * n - p_sum @ p_sum, n * n - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a @ b) / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    # (a multitask run's NAME/metric: the direction of metric)
    return new < best if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else new > best

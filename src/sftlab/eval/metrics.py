"""Task metrics: accuracy, macro-F1, MCC for classes; Pearson, Spearman, MSE for regression."""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# Metrics where lower is better; all others are maximised.
LOWER_IS_BETTER = {"loss", "mse", "perplexity"}


def compute_metrics(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task == "regression":
        pred = logits.reshape(-1)
        constant = np.allclose(pred, pred[0]) or np.allclose(labels, labels[0])
        return {
            "pearson": 0.0 if constant else float(pearsonr(pred, labels)[0]),
            "spearman": 0.0 if constant else float(spearmanr(pred, labels)[0]),
            "mse": float(np.mean((pred - labels) ** 2)),
        }
    pred = logits.argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, pred)),
    }


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best

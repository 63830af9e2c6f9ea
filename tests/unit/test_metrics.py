"""Our numpy metrics == scikit-learn's and scipy's on random, degenerate and tied inputs."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sftlab.eval.metrics import compute_metrics


@pytest.mark.parametrize("seed,n_classes,n", [(0, 2, 50), (1, 3, 200), (2, 5, 37), (3, 2, 1), (4, 4, 500)])
def test_classification_metrics_equal_sklearn(seed, n_classes, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 2.0 * np.eye(n_classes)[labels] * rng.integers(0, 2, (n, 1))
    pred = logits.argmax(-1)
    got = compute_metrics("classification", logits, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-12)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(labels, pred), abs=1e-12)


@pytest.mark.parametrize("labels,pred", [([0, 0, 0], [0, 0, 0]), ([0, 1, 1], [1, 1, 1]), ([2, 2, 0], [1, 1, 1]),
                                         ([0, 1, 2, 3], [3, 2, 1, 0])])
def test_degenerate_classification_equal_sklearn(labels, pred):
    labels, pred = np.array(labels), np.array(pred)
    logits = np.eye(4)[pred]
    got = compute_metrics("classification", logits, labels)
    assert got["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-12)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(labels, pred), abs=1e-12)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_regression_metrics_equal_scipy(seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=300)
    pred = y + rng.normal(scale=0.7, size=300)
    if ties:
        y, pred = np.round(y), np.round(pred * 2) / 2
    got = compute_metrics("regression", pred.reshape(-1, 1), y)
    assert got["pearson"] == pytest.approx(pearsonr(pred, y)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(spearmanr(pred, y)[0], abs=1e-12)
    assert got["mse"] == pytest.approx(np.mean((pred - y) ** 2), abs=1e-12)


def test_constant_predictions_score_zero_correlation():
    got = compute_metrics("regression", np.ones((5, 1)), np.arange(5.0))
    assert got["pearson"] == 0.0 and got["spearman"] == 0.0

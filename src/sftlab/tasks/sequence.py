"""Sequence tasks on an encoder's head: classification (cross-entropy over classes; accuracy, macro-F1, MCC) and
regression (one output, MSE; Pearson, Spearman). One loss unit per example."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import tasks
from . import TaskSpec


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float()


def classification_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _forward(model, batch)
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), logits


def regression_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _forward(model, batch)
    y, pred = batch["labels"], logits.squeeze(-1)
    known = ~torch.isnan(y)  # unlabelled rows (distill's second stream) carry NaN and add nothing
    if not known.all():
        y, pred = y[known], pred[known]
    return F.mse_loss(pred, y, reduction="sum"), logits


def _classes(labels):
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                problem_type="single_label_classification")


def _evaluator(name: str):
    def evaluate(model, data, *, batch_size, pad_id, device, bf16, max_tokens=None, pad_multiple=1) -> dict:
        from ..eval.infer import predict_logits
        from ..eval.metrics import compute_metrics

        logits, loss = predict_logits(model, data, name, batch_size=batch_size, pad_id=pad_id, device=device,
                                      bf16=bf16, max_tokens=max_tokens, pad_multiple=pad_multiple)
        return compute_metrics(name, logits, np.array(data.labels)) | {"loss": loss}
    return evaluate


def _collate(regression: bool):
    def collate(data, rows, pad_id, multiple=1, epoch=0):
        from ..data.batches import collate as pad

        return pad(data, rows, pad_id, regression, multiple)
    return collate


def _ones(data) -> list:
    return [1] * len(data)


tasks.register("classification")(TaskSpec(
    "classification", decoder=False, head_kwargs=_classes, loss=classification_loss, collate=_collate(False),
    units=_ones, examples=_ones, evaluate=_evaluator("classification"),
    metrics={"accuracy": True, "macro_f1": True, "mcc": True, "loss": False}))
tasks.register("regression")(TaskSpec(
    "regression", decoder=False, head_kwargs=lambda labels: dict(num_labels=1, problem_type="regression"),
    loss=regression_loss, collate=_collate(True), units=_ones, examples=_ones, evaluate=_evaluator("regression"),
    metrics={"pearson": True, "spearman": True, "mse": False, "loss": False}))

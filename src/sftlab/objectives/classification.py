"""Sequence classification (cross-entropy) and regression (MSE) on a model's `.logits`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import objectives


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits.float()


@objectives.register("classification")
def classification_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _forward(model, batch)
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), logits


@objectives.register("regression")
def regression_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _forward(model, batch)
    return F.mse_loss(logits.squeeze(-1), batch["labels"], reduction="sum"), logits

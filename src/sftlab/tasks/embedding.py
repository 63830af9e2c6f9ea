"""Sentence embeddings (`task: embedding`): an encoder whose mean-pooled last states embed a text, trained from raw
text by `objective: simcse` (objectives/simcse.py) and judged on sentence pairs with a gold similarity (STS-B):
Spearman correlation between the cosine of the two embeddings and the score, the default `train.metric`
(SimCSE, Gao et al. 2021, reports the same on STS-B).

Mean pooling over real tokens, not [CLS]: sentence-transformers models such as `minilm-l6` were trained with it,
and SimCSE's own unsupervised models are evaluated without their training-time MLP, so pooling is what the result
is used with. The model is the bare encoder (AutoModel); its pooler, which nothing here reads, is carried through as
buffers (tasks/masked_lm.py: _KeptPooler), so DDP sees no unused parameter and a classifier started from the
result (`model.name: RUN_DIR/best`) gets the original pooler.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.batches import Encoded
from ..registry import tasks
from . import TaskSpec


@dataclass
class ScoredPairs:
    """Dev data: both sides of each pair encoded, and the gold scores."""
    a: Encoded
    b: Encoded
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def embed(model, batch: dict) -> torch.Tensor:
    """Mean of the last hidden states over real tokens: [rows, width]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def _no_loss(model, batch):
    raise RuntimeError("task embedding has no supervised loss: train it with objective.name=simcse")


def _collate(data, rows, pad_id, multiple=1, epoch=0):
    from ..data.batches import collate

    return collate(data, rows, pad_id, False, multiple)


@torch.no_grad()
def embed_all(model, data: Encoded, *, batch_size: int, pad_id: int, device, bf16: bool) -> np.ndarray:
    import contextlib

    from ..data.batches import eval_batches

    out = [None] * len(data)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for idx in eval_batches(data.lengths, batch_size):
        batch = {k: v.to(device) for k, v in _collate(data, idx, pad_id).items()}
        with autocast:
            z = embed(model, batch).float().cpu().numpy()
        for i, row in zip(idx, z):
            out[i] = row
    return np.stack(out)


def evaluate(model, data: ScoredPairs, *, batch_size, pad_id, device, bf16, max_tokens=None, pad_multiple=1) -> dict:
    from ..eval.metrics import compute_metrics

    was_training = model.training
    model.eval()
    za, zb = (embed_all(model, x, batch_size=batch_size, pad_id=pad_id, device=device, bf16=bf16)
              for x in (data.a, data.b))
    model.train(was_training)
    cos = (za * zb).sum(1) / np.maximum(np.linalg.norm(za, axis=1) * np.linalg.norm(zb, axis=1), 1e-12)
    scores = compute_metrics("regression", cos, np.asarray(data.scores))
    return {"spearman": scores["spearman"], "pearson": scores["pearson"], "pairs": len(data)}


def after_load(model, folder: str, missing: set, data=None, labels=None) -> None:
    from .masked_lm import _KeptPooler

    pooler = getattr(model, "pooler", None)
    dense = getattr(pooler, "dense", None)
    if isinstance(dense, torch.nn.Linear):
        model.pooler = _KeptPooler({"weight": dense.weight.detach().clone(), "bias": dense.bias.detach().clone()})


tasks.register("embedding")(TaskSpec(
    "embedding", decoder=False, head_kwargs=lambda labels: {}, loss=_no_loss, collate=_collate,
    units=lambda data: [1] * len(data), examples=lambda data: [1] * len(data), evaluate=evaluate,
    metrics={"spearman": True, "pearson": True}, auto="AutoModel", head_reads_first_token=False,
    after_load=after_load))

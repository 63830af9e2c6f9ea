"""Batched inference on encoded data: logits in input order, with the mean loss where labels exist."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..data.batches import Encoded, eval_batches
from ..tasks import task_spec


@torch.no_grad()
def predict_logits(model, data: Encoded, task: str, *, batch_size: int, pad_id: int, device, bf16: bool,
                   max_tokens: int | None = None, pad_multiple: int = 1, progress: str | None = None):
    """Returns (logits [N, C] float32 in input order, mean loss or None). `max_tokens` caps a batch's padded
    tokens (eval_batches); `pad_multiple` rounds each batch's width up (collate). `progress`: a bar on stderr
    with this title (rows)."""
    import sys

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    spec = task_spec(task)
    out: list[np.ndarray | None] = [None] * len(data)
    total, labelled = 0.0, data.labels[0] is not None if len(data) else False
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    bar = tqdm(total=len(data), desc=progress, unit="row", file=sys.stderr, leave=False, disable=progress is None)
    for idx in eval_batches(data.lengths, batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in spec.collate(data, idx, pad_id, pad_multiple).items()}
        with autocast:
            if labelled:
                loss, logits = spec.loss(model, batch)
                total += float(loss)
            else:
                logits = model(**batch).logits.float()
        for row, i in zip(logits.cpu().numpy(), idx):
            out[i] = row
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return np.stack(out), (total / len(data) if labelled else None)


@torch.no_grad()
def lm_scores(model, data, *, batch_size: int, pad_id: int, device, bf16: bool) -> dict:
    """Token-weighted mean next-token loss and perplexity over every loss token of `data` (LMEncoded)."""
    import math

    from ..data.lm import collate_lm

    was_training = model.training
    model.eval()
    loss_fn = task_spec("causal_lm").loss
    total, tokens = 0.0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for idx in eval_batches(data.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate_lm(data, idx, pad_id).items()}
        with autocast:
            loss, _ = loss_fn(model, batch)
        total += float(loss)
        tokens += int((batch["labels"] != -100).sum())
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}

"""Causal LM: summed next-token cross-entropy over positions with a target (targets pre-shifted, -100 = none);
one loss unit per target token; judged on dev by token-weighted loss and perplexity (generation metrics come from
`sftlab eval`, eval/gen_eval.py).

Only positions with a target go through the output layer: prompts and padding never pay for the
vocabulary projection (49k columns for SmolLM2), which is most of a chat batch's logits cost.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..registry import tasks
from . import TaskSpec


def _wrapped(model) -> bool:
    # torch.distributed.fsdp costs 0.5 s to import (issue 22's fixed costs); a model can only be an FSDPModule
    # where train/sharding.py imported it already.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return isinstance(model, DistributedDataParallel) or (fsdp is not None and isinstance(model, fsdp.FSDPModule))


def causal_lm_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, logits [loss positions, vocab] in row-major order of the batch's loss positions)."""
    labels = batch["labels"]
    # use_cache=False: with a KV cache, transformers ignores position_ids when building the packed-sequence
    # (block-diagonal) mask, and attention would leak across packed examples.
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    keep = labels != -100
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    if _wrapped(model) or prompt_learning:
        # DDP syncs gradients only through its own forward, and FSDP gathers the root's parameters (embeddings,
        # head) in its own; peft's prompt/prefix tuning injects its virtual tokens in its own forward (prompt
        # tuning's logits include them at the front: keep the last L).
        logits = model(**inputs).logits[:, -labels.shape[1]:][keep]
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), logits
    hidden = model.get_decoder()(**inputs).last_hidden_state
    logits = model.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), logits


def _collate(data, rows, pad_id, multiple=1, epoch=0):
    from ..data.lm import collate_lm

    return collate_lm(data, rows, pad_id)  # packed rows carry their own positions: no width rounding


def _evaluate(model, data, *, batch_size, pad_id, device, bf16, max_tokens=None, pad_multiple=1) -> dict:
    from ..eval.infer import lm_scores

    return lm_scores(model, data, batch_size=batch_size, pad_id=pad_id, device=device, bf16=bf16)


tasks.register("causal_lm")(TaskSpec(
    "causal_lm", decoder=True, head_kwargs=lambda labels: {}, loss=causal_lm_loss, collate=_collate,
    units=lambda data: data.weights, examples=lambda data: data.row_examples, evaluate=_evaluate,
    metrics={"loss": False, "perplexity": False}))

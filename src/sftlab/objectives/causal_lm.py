"""Causal LM: summed next-token cross-entropy over positions with a target (targets pre-shifted, -100 = none).

Only positions with a target go through the output layer: prompts and padding never pay for the
vocabulary projection (49k columns for SmolLM2), which is most of a chat batch's logits cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..registry import objectives


@objectives.register("causal_lm")
def causal_lm_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, logits [loss positions, vocab] in row-major order of the batch's loss positions)."""
    labels = batch["labels"]
    # use_cache=False: with a KV cache, transformers ignores position_ids when building the packed-sequence
    # (block-diagonal) mask, and attention would leak across packed examples.
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    keep = labels != -100
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    if isinstance(model, DistributedDataParallel) or prompt_learning:
        # DDP syncs gradients only through its own forward; peft's prompt/prefix tuning injects its virtual
        # tokens in its own forward (prompt tuning's logits include them at the front: keep the last L).
        logits = model(**inputs).logits[:, -labels.shape[1]:][keep]
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), logits
    hidden = model.get_decoder()(**inputs).last_hidden_state
    logits = model.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), logits

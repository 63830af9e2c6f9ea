"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT): the head first, then one more block from the top every
`strategy.unfreeze_every` steps (default: once per epoch), the embeddings (and a decoder's lm_head) last.

The optimizer holds every parameter from the start. A frozen parameter has no gradient, and AdamW skips
parameters without one, so it has no moment estimates and no step count until it joins: its bias correction
starts at its own first step, and weight decay never touches it while frozen.
"""
from __future__ import annotations

from ..registry import strategies
from .basic import new_head, train_only
from . import Plan
from .anatomy import anatomy


@strategies.register("gradual_unfreezing")
def gradual_unfreezing(model, cfg, ctx):
    a = anatomy(model)
    every = cfg.unfreeze_every or max(1, ctx.steps_per_epoch)
    # stage s trains the head and the top s blocks; stage num_blocks + 1 adds the embeddings
    stages = [set(new_head(a, ctx)) | set(a.top)]
    for block in reversed(a.blocks):
        stages.append(stages[-1] | set(block))
    stages.append(stages[-1] | set(a.embeddings) | set(a.head))  # a decoder's pretrained lm_head joins last
    current = {"stage": None}

    def on_step(step: int) -> None:
        stage = min(step // every, len(stages) - 1)
        if stage != current["stage"]:
            train_only(model, stages[stage])
            current["stage"] = stage

    on_step(0)
    return Plan(model, on_step=on_step, optimize_frozen=True)

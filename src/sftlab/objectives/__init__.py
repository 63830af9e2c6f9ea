"""Objectives: (model, batch) -> (sum of per-example losses, logits). Chosen by `task`.

Losses are *sums*: the loop divides by the step batch's example count, so accumulation and several
processes give exactly the mean over the whole step batch.
"""
from . import causal_lm, classification  # noqa: F401  (registers the task losses)
from . import distill, sft  # noqa: F401,E402  (registers the training objectives)

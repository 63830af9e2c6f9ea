"""Training objectives: how a micro-batch's loss is formed from the task's loss (tasks/) and what the objective
brings (a teacher, extra streams, trainable extras). Chosen by `objective.name`; docs/objectives.md.

Losses are *sums*: the loop divides by the step batch's loss units, so accumulation and several processes give
exactly the mean over the whole step batch.
"""
from . import contrastive_pairs, dann, distill, gan_bert, mmd, sft, simcse, udalm  # noqa: F401  (registers the training objectives)

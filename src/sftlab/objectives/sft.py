"""`objective.name: sft` (the default): the task's own loss, today's behaviour bit for bit.

A training objective is a leaf chosen by `objective.name` that owns its `Config` class and forms the training loss
of one micro-batch from the task loss (tasks/sequence.py, causal_lm.py) and whatever else it brings (a
frozen teacher's cached logits for `distill`). It returns the loss SUM of the micro-batch and its named parts
(detached, same scale), which the loop logs as `loss/<part>`; the loop divides by the step's loss units as before,
so accumulation, processes and resume stay exact. Frozen extras are fingerprinted (`frozen()`), checked on resume.
This is the first step toward the interface of shared/design/fusion-architecture.md section 2.3 (streams, trainable
extras and phases come with the objectives that need them).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ..config import ObjectiveConfig
from ..registry import training_objectives


class LossOut(NamedTuple):
    total: torch.Tensor  # the micro-batch's loss sum: the loop scales it by world / step units and backpropagates
    parts: dict[str, torch.Tensor]  # detached sums on the same scale, logged as loss/<name>


class SFTConfig(ObjectiveConfig):
    name: Literal["sft"] = "sft"


@training_objectives.register("sft")
class SFT:
    Config = SFTConfig

    def __init__(self, cfg, data, task_loss, tokenizer):
        self.task_loss = task_loss

    @staticmethod
    def check(cfg) -> None:
        """Checks that need more than the config (files, other models), run before anything is written: none."""

    @staticmethod
    def internals(cfg) -> set[str]:
        """Student outputs beyond logits the objective reads ("attentions", "hidden_states"): none here."""
        return set()

    def extras(self) -> torch.nn.ModuleDict:
        """Trainable modules beside the model (optimized and checkpointed with it): none here."""
        return torch.nn.ModuleDict()

    def frozen(self) -> dict[str, str]:
        """Fingerprints of frozen extra models, stored in checkpoints and checked on resume: none here."""
        return {}

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        """rows: the micro-batch's row ids; units: this step's loss units per stream, over every process."""
        loss_sum, _ = self.task_loss(model, batch)
        return LossOut(loss_sum, {})

"""`objective.name: mmd`: the task loss on the source stream plus a multi-kernel MMD between the source and target
features the head reads (DAN, Long et al. 2015; for text, e.g. the BERT-DAN baselines of Du et al. 2020):

    loss = task loss (source rows) + weight * MMD^2(source features, target features)

MMD is computed per micro-batch (both streams are in each one, in the step's proportion; domain.py) and enters
the step's mean weighted by the micro-batch's source rows, so one micro-batch per step gives exactly
`task mean + weight * MMD^2`. weight 0 is plain SFT on the source rows, bit for bit (tested). Pitfall: a single
fixed bandwidth makes MMD vanish (too wide) or saturate (too narrow) as the features move during training; the
multi-kernel family tied to the batch's own distances (DAN) keeps it informative. Logged: loss/task, loss/mmd.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from ..config import ObjectiveConfig
from ..registry import training_objectives
from .domain import HeadInput, check_streams, mmd2, streams
from .sft import LossOut


class MMDConfig(ObjectiveConfig):
    name: Literal["mmd"] = "mmd"
    weight: float = 1.0
    """Weight of MMD^2 against the task loss (DAN: 0.1-1; 0 is plain SFT on the source)."""
    kernels: int = 5
    """Gaussian kernels at bandwidth multipliers 2^-(k//2) ... 2^(k//2) of the batch's mean squared distance."""

    @model_validator(mode="after")
    def _check(self):
        if not self.weight >= 0:
            raise ValueError(f"objective.weight must be >= 0 (0 turns MMD off), got {self.weight}")
        if self.kernels < 1:
            raise ValueError(f"objective.kernels must be >= 1, got {self.kernels}")
        return self


@training_objectives.register("mmd")
class MMD:
    Config = MMDConfig

    def __init__(self, cfg, data, task_loss, tokenizer):
        o = cfg.objective
        self.task_loss, self.weight = task_loss, o.weight
        self.multipliers = tuple(2.0 ** (k - o.kernels // 2) for k in range(o.kernels))
        self.n_labelled = len(data.splits["train"].examples)

    @staticmethod
    def check(cfg) -> None:
        check_streams(cfg, "mmd")

    @property
    def reads_unlabelled(self) -> bool:
        return self.weight > 0

    @staticmethod
    def internals(cfg) -> set[str]:
        return set()

    def extras(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict()

    def frozen(self) -> dict[str, str]:
        return {}

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        if self.weight == 0:
            task, _ = self.task_loss(model, batch)
            return LossOut(task, {"task": task.detach()})
        with HeadInput(model) as features:
            task, _ = self.task_loss(model, batch)
        target = streams(rows, self.n_labelled, task.device)
        n_source = int((~target).sum())
        if n_source == 0 or not target.any():
            return LossOut(task, {"task": task.detach()})
        mmd = mmd2(features.value[~target], features.value[target], self.multipliers) * n_source
        return LossOut(task + self.weight * mmd, {"task": task.detach(), "mmd": mmd.detach()})

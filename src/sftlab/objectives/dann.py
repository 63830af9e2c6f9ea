"""`objective.name: dann`: domain-adversarial training (DANN, Ganin et al. 2016, "Domain-Adversarial Training of
Neural Networks", JMLR 17). A domain classifier (a trainable extra: Linear-ReLU-Linear on the features the head
reads) learns to tell source rows from target rows; a gradient reversal layer between it and the encoder turns
that into features it cannot tell apart:

    loss = task loss (source rows) + weight * BCE(domain classifier(GRL_lambda(features)), domain)

The domain loss is the mean over both streams' rows of the step. lambda follows the paper's schedule
2 / (1 + exp(-gamma * p)) - 1 over training progress p in [0, 1] (gamma 10), so the noisy early domain signal does not
wreck the pretrained features; the domain classifier itself always learns at full strength. Pitfall: reversing the
gradient with a constant lambda from step 0, or also into the domain classifier (it then learns nothing), are the
usual bugs; the test checks the reversal reaches exactly the encoder. weight 0 is plain SFT on the source rows, bit
for bit. Logged: loss/task, loss/domain.

Defaults chosen on the source dev set (reviews books -> electronics, minilm-l6 mean-pooled, 2026-12-07): weight 1
let the reversed gradient (Adam gives every encoder weight a full-size step whatever the term's scale) push the
features past the classifier every step, so the domain loss climbed to 1.4-1.5, above the ln 2 of a classifier at
chance, and target rows, which no task loss anchors, crossed the class boundary (source dev 0.857, target dev
0.617); weight 0.1: source dev 0.877, domain loss ~0.67. `classifier_lr_scale` 20 (source dev 0.883, two rows more:
noise) let the classifier learn the domains (loss 0.31 by step 30) and then oscillate (3.3 at step 50), so 1 stays.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..config import ObjectiveConfig
from ..registry import training_objectives
from .domain import check_streams, features, model_width, reverse_gradient
from .sft import LossOut


class DANNConfig(ObjectiveConfig):
    name: Literal["dann"] = "dann"
    weight: float = 0.1
    """Weight of the domain classifier's loss (0 is plain SFT on the source). 0.1, not Ganin et al.'s 1: see above."""
    gamma: float = 10.0
    """Steepness of the reversal coefficient's schedule 2 / (1 + exp(-gamma p)) - 1 (Ganin et al.: 10)."""
    hidden: int | None = None
    """Width of the domain classifier's hidden layer; default: the model's hidden size."""
    classifier_lr_scale: float = 1.0
    """The domain classifier's learning rate as a multiple of train.lr (its schedule is the run's)."""

    @model_validator(mode="after")
    def _check(self):
        if not self.weight >= 0:
            raise ValueError(f"objective.weight must be >= 0 (0 turns the domain loss off), got {self.weight}")
        if not self.gamma >= 0:
            raise ValueError(f"objective.gamma must be >= 0 (0: no reversal), got {self.gamma}")
        if not self.classifier_lr_scale > 0:
            raise ValueError(f"objective.classifier_lr_scale must be > 0 (1: train.lr), got {self.classifier_lr_scale}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"objective.hidden must be >= 1 (or null for the model's width), got {self.hidden}")
        return self


@training_objectives.register("dann")
class DANN:
    Config = DANNConfig
    streams_apart = True  # the loop collates source and target rows apart (domain.py: why)

    def __init__(self, cfg, data, task_loss, tokenizer):
        o = cfg.objective
        self.task_loss, self.weight, self.gamma, self.coefficient = task_loss, o.weight, o.gamma, 0.0
        self.lr_scale = o.classifier_lr_scale
        self.n_labelled = len(data.splits["train"].examples)
        width = model_width(cfg)
        with torch.random.fork_rng(devices=[]):  # its init draws apart: the run's dropout masks stay SFT's
            torch.manual_seed(cfg.train.seed * 7 + 2)
            self.classifier = torch.nn.Sequential(torch.nn.Linear(width, o.hidden or width), torch.nn.ReLU(),
                                                  torch.nn.Linear(o.hidden or width, 1))

    @staticmethod
    def check(cfg) -> None:
        check_streams(cfg, "dann")

    @property
    def reads_unlabelled(self) -> bool:
        return self.weight > 0

    @staticmethod
    def internals(cfg) -> set[str]:
        return set()

    def extras_lr_scale(self, name: str) -> float:
        return self.lr_scale

    def extras(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"domain_classifier": self.classifier})

    def frozen(self) -> dict[str, str]:
        return {}

    def on_step(self, step: int, total: int) -> None:
        """Before each optimizer step: the reversal coefficient at progress step / total."""
        self.coefficient = 2.0 / (1.0 + math.exp(-self.gamma * step / max(total, 1))) - 1.0

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        if self.weight == 0:
            task, _ = self.task_loss(model, batch)
            return LossOut(task, {"task": task.detach()})
        task, source, target = features(self.task_loss, model, batch, rows, self.n_labelled)
        both = torch.cat([x for x in (source, target) if x is not None])
        domain = torch.cat([torch.full((len(x),), float(d), device=both.device)
                            for d, x in enumerate((source, target)) if x is not None])
        logits = self.classifier(reverse_gradient(both, self.coefficient).float()).squeeze(-1)
        # mean over the step's rows of both streams, once the loop divides by the labelled units
        bce = F.binary_cross_entropy_with_logits(logits, domain, reduction="sum")
        bce = bce * units["train"] / (units["train"] + units["unlabelled"])
        return LossOut(task + self.weight * bce, {"task": task.detach(), "domain": bce.detach()})

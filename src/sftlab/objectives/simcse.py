"""`objective.name: simcse`: unsupervised SimCSE (Gao, Yao & Chen 2021, "SimCSE: Simple Contrastive Learning of
Sentence Embeddings", EMNLP), for `task: embedding` on raw text.

Every row is encoded twice in one forward (the batch stacked on itself); dropout makes the two views differ, and
each view must pick its twin among the micro-batch's other rows (in-batch negatives):

    loss = sum over rows i of cross-entropy(cos(z_i, z'_j) / temperature over j, target i)

Pitfalls (paper, section 3): dropout is the only augmentation, so a model without dropout (or with it turned off)
learns nothing (the positives are then identical: cosine 1, tested); temperature 0.05 is the paper's; negatives come
from the micro-batch, so accumulation or processes change them (as for MMD, objectives/domain.py) and a larger
micro-batch gives more negatives. Logged: loss/contrastive.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..config import ObjectiveConfig
from ..errors import ConfigError
from ..registry import training_objectives
from .sft import LossOut


class SimCSEConfig(ObjectiveConfig):
    name: Literal["simcse"] = "simcse"
    temperature: float = 0.05
    """Softmax temperature of the cosine similarities (SimCSE: 0.05)."""

    @model_validator(mode="after")
    def _check(self):
        if not self.temperature > 0:
            raise ValueError(f"objective.temperature must be > 0 (SimCSE: 0.05), got {self.temperature}")
        return self


def contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed InfoNCE of each z1 row against all z2 rows, its twin the positive."""
    sim = F.cosine_similarity(z1.float()[:, None], z2.float()[None], dim=-1) / temperature
    return F.cross_entropy(sim, torch.arange(len(z1), device=sim.device), reduction="sum")


@training_objectives.register("simcse")
class SimCSE:
    Config = SimCSEConfig

    def __init__(self, cfg, data, task_loss, tokenizer):
        self.temperature = cfg.objective.temperature

    @staticmethod
    def check(cfg) -> None:
        if cfg.task != "embedding":
            raise ConfigError(f"objective.name: simcse trains task embedding, not {cfg.task}")

    @staticmethod
    def internals(cfg) -> set[str]:
        return set()

    def extras(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict()

    def frozen(self) -> dict[str, str]:
        return {}

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        from ..tasks.embedding import embed

        n = batch["input_ids"].shape[0]
        z = embed(model, {k: torch.cat([v, v]) for k, v in batch.items()})
        loss = contrastive(z[:n], z[n:], self.temperature)
        return LossOut(loss, {"contrastive": loss.detach()})

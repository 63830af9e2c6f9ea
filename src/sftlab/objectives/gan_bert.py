"""`objective.name: gan_bert`: semi-supervised GAN-BERT (Croce, Castellucci & Basili, ACL 2020, "GAN-BERT:
Generative Adversarial Learning for Robust Text Classification with a Bunch of Labeled Examples"; reference code
crux82/ganbert-pytorch).

A generator (noise -> Linear-LeakyReLU-Dropout-Linear, as the reference) makes fake vectors in the space the
classification head reads. The discriminator is the model's own k-class head plus one trainable "fake" logit on the
same input (a (k+1)-class discriminator whose first k columns are the saved classifier, so best/ is a plain k-class
model with exactly those logits). Per step, over the real rows (labelled + unlabelled stream) and one fake per row:

    d_sup   = CE over k+1 classes on the labelled rows
    d_unsup = -mean log(1 - P(fake | real)) - mean log P(fake | generated)
    g_adv   = -mean log(1 - P(fake | generated))
    g_feat  = || mean real features - mean generated features ||^2 / width   (feature matching, Salimans 2016)

The two phases: d_sup + d_unsup train the encoder, head and fake logit (generated vectors detached); g_adv + g_feat
train the generator only (the discriminator enters that loss through detached copies of its weights, the real
features detached). Pitfall, and the reference's: it calls g_loss.backward() then d_loss.backward() on the same
graph, so the discriminator and encoder also step along the generator's gradient (and the generator receives
nothing from d_loss only because it is detached there); here each phase moves only its own model, so both step in
one backward from the same parameters, as the reference's two optimizers do, without the cross-talk. Noise is a
pure function of (seed, step, row): resume and 2 processes stay exact. Logged: loss/d_sup, d_unsup, g_adv, g_feat.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..config import ObjectiveConfig
from ..errors import ConfigError
from ..registry import training_objectives
from .domain import HeadInput, head_module, model_width
from .sft import LossOut


class GanBertConfig(ObjectiveConfig):
    name: Literal["gan_bert"] = "gan_bert"
    noise_size: int = 100
    """Width of the generator's input noise (the reference: 100)."""
    epsilon: float = 1e-8
    """Inside every log (the reference's)."""

    @model_validator(mode="after")
    def _check(self):
        if self.noise_size < 1:
            raise ValueError(f"objective.noise_size must be >= 1, got {self.noise_size}")
        if not 0 < self.epsilon < 1e-2:
            raise ValueError(f"objective.epsilon must be in (0, 0.01), got {self.epsilon}")
        return self


@training_objectives.register("gan_bert")
class GanBert:
    Config = GanBertConfig

    def __init__(self, cfg, data, task_loss, tokenizer):
        o = cfg.objective
        self.task_loss, self.noise_size, self.eps, self.seed, self.step = task_loss, o.noise_size, o.epsilon, \
            cfg.train.seed, 0
        self.checked = False  # the head maps its input to the k logits (checked once, on the first batch)
        width = model_width(cfg)
        with torch.random.fork_rng(devices=[]):  # its init draws apart: the run's dropout masks stay SFT's
            torch.manual_seed(cfg.train.seed * 7 + 3)
            self.generator = torch.nn.Sequential(torch.nn.Linear(o.noise_size, width), torch.nn.LeakyReLU(0.2),
                                                 torch.nn.Dropout(0.1), torch.nn.Linear(width, width))
            self.fake_logit = torch.nn.Linear(width, 1)

    @staticmethod
    def check(cfg) -> None:
        if cfg.data.unlabelled is None:
            raise ConfigError("objective.name: gan_bert learns from unlabelled rows: set data.unlabelled (a file, or "
                              "the training file itself with data.k_shot: its rows outside the sample)")
        if cfg.task != "classification":
            raise ConfigError(f"objective.name: gan_bert is for task classification, not {cfg.task}")

    @staticmethod
    def internals(cfg) -> set[str]:
        return set()

    def extras(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"generator": self.generator, "fake_logit": self.fake_logit})

    def frozen(self) -> dict[str, str]:
        return {}

    def on_step(self, step: int, total: int) -> None:
        self.step = step

    def noise(self, rows: list[int], device) -> torch.Tensor:
        z = np.stack([np.random.default_rng([self.seed, self.step, r]).standard_normal(self.noise_size) for r in rows])
        return torch.from_numpy(z).float().to(device)

    def parts(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> dict[str, torch.Tensor]:
        """The four loss terms (sums on the loop's per-labelled-row scale), each attached to its own phase's model."""
        head = head_module(model)
        with HeadInput(model) as seen:
            _, logits = self.task_loss(model, batch)
        real = seen.value.float()
        fake = self.generator(self.noise(rows, real.device))
        shaped = fake[:, None, :] if seen.three_d else fake  # what the head is handed (RoBERTa-style heads: [CLS] seq)

        def discriminate(x, params=None):  # [n, k + 1] logits of vectors in the head's input space
            if params is None:
                return torch.cat([head(x).float(), self.fake_logit(x[:, 0] if x.dim() == 3 else x).float()], -1)
            return torch.cat([torch.func.functional_call(head, params[0], (x,)).float(),
                              torch.func.functional_call(self.fake_logit, params[1],
                                                         (x[:, 0] if x.dim() == 3 else x,)).float()], -1)

        if not self.checked and head(real[:1, None] if seen.three_d else real[:1]).shape[-1] != logits.shape[-1]:
            raise ConfigError("objective.name: gan_bert needs a head that maps its input to the class logits in one "
                              "module (BERT, MiniLM, MPNet, RoBERTa); this model's does not (DistilBERT?)")
        self.checked = True
        real_all = torch.cat([logits, self.fake_logit(real)], -1)
        labels = batch["labels"]
        d_sup = F.cross_entropy(real_all, labels, ignore_index=-100, reduction="sum")
        p_fake_real = real_all.softmax(-1)[:, -1]
        p_fake_gen = discriminate(shaped.detach()).softmax(-1)[:, -1]
        frozen = ({k: v.detach() for k, v in head.named_parameters()},
                  {k: v.detach() for k, v in self.fake_logit.named_parameters()})
        p_fake_gen_g = discriminate(shaped, frozen).softmax(-1)[:, -1]
        # means over the step's real rows (both streams) once the loop divides by the labelled units
        scale = units["train"] / (units["train"] + units.get("unlabelled", 0))
        d_unsup = (-torch.log(1 - p_fake_real + self.eps).sum() - torch.log(p_fake_gen + self.eps).sum()) * scale
        g_adv = -torch.log(1 - p_fake_gen_g + self.eps).sum() * scale
        g_feat = (real.detach().mean(0) - fake.mean(0)).pow(2).mean() * len(rows) * scale
        return {"d_sup": d_sup, "d_unsup": d_unsup, "g_adv": g_adv, "g_feat": g_feat}

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        parts = self.parts(model, batch, rows, units)
        return LossOut(sum(parts.values()), {k: v.detach() for k, v in parts.items()})

"""`objective.name: distill`: knowledge distillation from a frozen teacher's cached logits (Hinton et al. 2015).

loss = (1 - alpha) * task loss + alpha * T^2 * KL(teacher_T || student_T) per row (kd_losses.soft_kl; regression:
the squared difference to the teacher's prediction). The teacher's logits for every training row are computed once
before training at inference speed and cached by content (teacher.py): a step costs the student's forward and
backward plus a [rows, classes] lookup. The teacher tokenizes the text its own way, so logit KD works across
tokenizers and architectures; its label set must equal the student's (checked). The teacher is fingerprinted in
every checkpoint: a resume with a changed teacher is refused.

Decoders (`task: causal_lm`): token-level KD on the teacher's top-k next-token distribution at every loss position
(kd_losses.topk_kl), cached the same way; the teacher must share the student's vocabulary (checked).

alpha = 0 is the task loss itself (kd_losses.mix), so the run equals `sft` bit for bit (tested).

Intermediate layers (encoders, same tokenizer; internals.py): `attention_weight` x attention-map MSE and
`hidden_weight` x hidden-state MSE (TinyBERT) are added to the loss above; the teacher then runs live on each
micro-batch (its logits from that pass are the soft targets) and a projection joins the trainable extras when the
widths differ. loss = (1 - alpha) * hard + alpha * soft + attention_weight * attention + hidden_weight * hidden.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import model_validator

from ..config import ObjectiveConfig
from ..errors import ConfigError
from ..registry import training_objectives
from .internals import LiveTeacher, Recording, plan
from .kd_losses import mix, soft_kl, topk_kl
from .sft import LossOut
from .teacher import _open, _same_labels, fingerprint, model_folder, teacher_logits, teacher_topk


class DistillConfig(ObjectiveConfig):
    name: Literal["distill"] = "distill"
    teacher: str
    """A run directory (its best/), an `sftlab export` folder, or an HF folder whose config names its classes."""
    temperature: float = 2.0
    """Softens both distributions; the soft term is scaled by T^2 so its gradients keep their size (Hinton)."""
    alpha: float = 0.5
    """Weight of the soft loss; (1 - alpha) on the hard-label task loss. 0: plain SFT."""
    attention_weight: float = 0.0
    """Weight of the attention-map MSE (TinyBERT; same tokenizer and heads). Usual: 1."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE, through a learned projection when widths differ (TinyBERT). Usual: 1."""
    layer_map: Literal["auto"] | list[int] = "auto"
    """Student layer i <- teacher layer (for the intermediate terms); auto = uniform."""
    cache: Literal["auto"] | bool = "auto"
    """Teacher logits cached on disk by content (auto and true); false recomputes them for this run only."""
    top_k: int = 32
    """Decoders: the teacher's k most likely next tokens per loss position are the soft target (renormalised)."""

    @model_validator(mode="after")
    def _check(self):
        if not self.temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {self.temperature}; 1 is the plain softmax, "
                             f"2-4 are usual")
        if self.top_k < 1:
            raise ValueError(f"objective.top_k must be >= 1, got {self.top_k}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"objective.alpha must be in [0, 1] (the soft loss's weight), got {self.alpha}")
        for key in ("attention_weight", "hidden_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"objective.{key} must be >= 0 (0 turns the term off), got {getattr(self, key)}")
        if self.layer_map != "auto" and not self.layer_map:
            raise ValueError("objective.layer_map: give one teacher layer per student layer, or auto")
        return self


@training_objectives.register("distill")
class Distill:
    Config = DistillConfig

    def __init__(self, cfg, data, task_loss, tokenizer):
        o = cfg.objective
        self.task_loss, self.alpha, self.temperature = task_loss, o.alpha, o.temperature
        self.regression, self.causal = cfg.task == "regression", cfg.task == "causal_lm"
        self.fp, self.live = fingerprint(o.teacher), None
        if self.causal:  # token-level: the teacher's top-k next tokens at every loss position of every row
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            self.targets = teacher_topk(o.teacher, data.encoded["train"], tokenizer, k=o.top_k,
                                        temperature=o.temperature, pad_id=pad, cache=o.cache is not False)
            return
        labels = data.labels.names if data.labels else None
        self.n_labelled = len(data.splits["train"].examples)
        if self.internals(cfg):  # a live teacher: its logits come from the same pass as its internals
            self.live = LiveTeacher(model_folder(o.teacher), cfg, tokenizer, _open)
            _same_labels(o.teacher, self.live.labels, labels)
            return
        tables = []
        for stream in ("train", "unlabelled"):  # one row space: unlabelled rows follow the labelled ones (loop.py)
            if stream not in data.splits:
                continue
            examples = data.splits[stream].examples
            pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
            tables.append(teacher_logits(o.teacher, [e.text for e in examples], pairs, labels=labels,
                                         max_length=cfg.data.max_length, cache=o.cache is not False))
        self.teacher = torch.from_numpy(np.concatenate(tables))

    @classmethod
    def check(cls, cfg) -> None:
        """Before anything is written: the teacher exists and, for the intermediate terms, fits the student."""
        folder = model_folder(cfg.objective.teacher)
        if cls.internals(cfg):
            from ..models import load_tokenizer

            if cfg.task == "causal_lm":
                raise ConfigError("objective.attention_weight / hidden_weight: intermediate-layer distillation is for "
                                  "encoders (classification, regression); decoders take token-level KD (set both "
                                  "to 0)")
            plan(cfg, folder, load_tokenizer(cfg.model.name, cfg.model.trust_remote_code))

    @staticmethod
    def internals(cfg) -> set[str]:
        """Student outputs beyond logits this objective reads (the loop keeps the model able to return them)."""
        o = cfg.objective
        return {name for name, w in (("attentions", o.attention_weight), ("hidden_states", o.hidden_weight)) if w}

    def extras(self) -> torch.nn.ModuleDict:
        """Trainable modules beside the model (the hidden-state projection): optimized and checkpointed."""
        return self.live.extras if self.live is not None else torch.nn.ModuleDict()

    def frozen(self) -> dict[str, str]:
        return {"teacher": self.fp}

    def _soft_classes(self, logits, target):
        return soft_kl(logits, target, self.temperature)

    @staticmethod
    def _soft_regression(logits, target):  # squared distance to the teacher's prediction (no temperature)
        return ((logits.float().squeeze(-1) - target.squeeze(-1)) ** 2).sum()

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        if self.live is not None:
            model = Recording(model, **self.live.flags())
        hard, logits = self.task_loss(model, batch)
        if self.causal:  # logits: [loss positions, vocab], row-major in `rows` order, as the cache stores them
            off = self.targets["offsets"]
            pick = torch.cat([torch.arange(int(off[i]), int(off[i + 1])) for i in rows])
            values, ids, lse = (self.targets[n][pick].to(logits.device) for n in ("values", "ids", "lse"))
            soft = topk_kl(logits, values, ids, self.temperature, lse)
            return LossOut(mix(hard, soft, self.alpha), {"hard": hard.detach(), "soft": soft.detach()})
        t_out = self.live.forward(batch) if self.live is not None else None
        target = t_out.logits.float() if t_out is not None else self.teacher[rows].to(logits.device)
        unl = torch.tensor([r >= self.n_labelled for r in rows], device=logits.device)
        soft_of = self._soft_regression if self.regression else self._soft_classes
        if not unl.any():
            soft = soft_of(logits, target)
            total, parts = mix(hard, soft, self.alpha), {"hard": hard.detach(), "soft": soft.detach()}
        else:
            # Unlabelled rows: soft targets only, weighted alpha, as the mean over the step's unlabelled rows (the
            # loop divides every sum by the labelled units, so their sum is rescaled by labelled / unlabelled units).
            soft = soft_of(logits[~unl], target[~unl])
            soft_u = soft_of(logits[unl], target[unl]) * units["train"] / units["unlabelled"]
            total = mix(hard, soft, self.alpha) + self.alpha * soft_u
            parts = {"hard": hard.detach(), "soft": soft.detach(), "soft_unlabelled": soft_u.detach()}
        if t_out is not None:  # intermediate terms: per-row sums; unlabelled rows as their stream's mean, as above
            terms = self.live.terms(model.out, t_out, batch["attention_mask"], ~unl if unl.any() else None)
            if unl.any():
                scale = units["train"] / units["unlabelled"]
                for name, value in self.live.terms(model.out, t_out, batch["attention_mask"], unl).items():
                    terms[name] = terms[name] + value * scale
            for name, value in terms.items():
                total = total + getattr(self.live, f"{name}_weight") * value
                parts[name] = value.detach()
        return LossOut(total, parts)

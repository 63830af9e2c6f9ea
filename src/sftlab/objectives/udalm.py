"""`objective.name: udalm`: the task loss on the labelled source rows and masked LM on the unlabelled target rows,
in the same steps and the same forward (UDALM, Karouzos et al. 2021, "UDALM: Unsupervised Domain Adaptation through
Language Modeling", NAACL):

    loss = task loss (source rows) + weight * masked-LM loss (target rows)

The target rows of each micro-batch are masked as `task: masked_lm` masks (15%, 80/10/10, tasks/masked_lm.py), as a
pure function of (seed, step, row), so resume is exact. The MLM head is a trainable extra (dense + GELU + LayerNorm
and an output bias; the decoder is the model's own word embeddings, tied as in BERT), starting from the unigram model
of the target text (masked_lm.after_load: why). The masked-LM term is the mean over the step's target rows of each
row's mean loss per masked token. Pitfall (UDALM section 3): running MLM first and then fine-tuning alone lets the
task forget the target domain; mixing keeps both. The paper weights them equally; our default is 0.1 (the config
field says why).
weight 0 is plain SFT on the source, bit for bit. Logged: loss/task, loss/mlm.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..config import ObjectiveConfig
from ..registry import training_objectives
from .domain import check_streams
from .internals import Recording
from .sft import LossOut


class UDALMConfig(ObjectiveConfig):
    name: Literal["udalm"] = "udalm"
    weight: float = 0.1
    """Weight of the target masked-LM loss (0 is plain SFT on the source). 0.1, not the paper's 1: the paper starts
    from a model already trained by MLM on the target, with a trained head; from minilm-l6's fresh head the MLM loss
    (~6 nats) drowned the task (books -> dvd: source dev 0.760 at weight 1, 0.853 at 0.1; source-only 0.870)."""
    mlm_probability: float = 0.15
    """Fraction of the target rows' non-special tokens chosen for the masked-LM loss."""

    @model_validator(mode="after")
    def _check(self):
        if not self.weight >= 0:
            raise ValueError(f"objective.weight must be >= 0 (0 turns masked LM off), got {self.weight}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"objective.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        return self


class MLMHead(torch.nn.Module):
    """BERT's prediction head without its decoder matrix (the model's word embeddings are used)."""

    def __init__(self, width: int, vocab: int, prior: torch.Tensor):
        super().__init__()
        self.dense, self.norm = torch.nn.Linear(width, width), torch.nn.LayerNorm(width)
        self.bias = torch.nn.Parameter(prior.clone())
        with torch.no_grad():  # identity transform, unigram bias: masked_lm.after_load's start (why: there)
            self.dense.weight.copy_(torch.eye(width))
            self.dense.bias.zero_()

    def forward(self, hidden, embeddings):
        return F.linear(self.norm(F.gelu(self.dense(hidden))), embeddings, self.bias)


@training_objectives.register("udalm")
class UDALM:
    Config = UDALMConfig
    streams_apart = True  # the loop collates source and target rows apart (domain.py: why)

    def __init__(self, cfg, data, task_loss, tokenizer):
        from transformers import AutoConfig

        from ..models import resolve_model
        from ..tasks.masked_lm import MaskedEncoded

        o = cfg.objective
        self.task_loss, self.weight, self.step = task_loss, o.weight, 0
        self.n_labelled = len(data.splits["train"].examples)
        if tokenizer.mask_token_id is None:
            from ..errors import ConfigError

            raise ConfigError(f"objective.name: udalm masks the target text, but the tokenizer of {cfg.model.name} "
                              "has no mask token; use mmd or dann")
        target = data.encoded["unlabelled"]
        self.target = MaskedEncoded(target.input_ids, target.token_type_ids, target.labels, 0, seed=cfg.train.seed,
                                    probability=o.mlm_probability, mask_id=tokenizer.mask_token_id,
                                    vocab_size=len(tokenizer), specials=tuple(sorted(set(tokenizer.all_special_ids))))
        mc = AutoConfig.from_pretrained(resolve_model(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
        width = next(getattr(mc, k) for k in ("hidden_size", "dim", "d_model") if isinstance(getattr(mc, k, None), int))
        counts = np.bincount(np.concatenate([np.asarray(x) for x in target.input_ids]), minlength=mc.vocab_size)
        prior = torch.from_numpy(np.log((counts[:mc.vocab_size] + 1) / (counts.sum() + mc.vocab_size))).float()
        self.head = MLMHead(width, mc.vocab_size, prior)

    @staticmethod
    def check(cfg) -> None:
        check_streams(cfg, "udalm")

    @staticmethod
    def internals(cfg) -> set[str]:
        # The target forward asks for hidden states itself (the speed patches take their full path for it), and the
        # source forward keeps them: nothing to turn off for the whole run.
        return set()

    @property
    def reads_unlabelled(self) -> bool:
        return self.weight > 0

    def extras(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"mlm_head": self.head})

    def frozen(self) -> dict[str, str]:
        return {}

    def on_step(self, step: int, total: int) -> None:
        self.step = step  # masks are drawn per (seed, step, row)

    def __call__(self, model, batch: dict, rows: list[int], units: dict[str, int]) -> LossOut:
        from ..tasks.masked_lm import draw

        if self.weight == 0:
            task, _ = self.task_loss(model, batch)
            return LossOut(task, {"task": task.detach()})
        apart = "unlabelled" in batch  # source and target rows collated apart: two forwards (domain.py: why)
        masked, rows_m = (batch["unlabelled"], [r for r in rows if r >= self.n_labelled]) if apart else (batch, rows)
        ids, mlm_labels = masked["input_ids"].clone(), torch.full_like(masked["input_ids"], -100)
        for r, row in enumerate(rows_m):
            if row >= self.n_labelled:
                pos, shown, orig = draw(self.target, row - self.n_labelled, self.step)
                pos = torch.from_numpy(pos).to(ids.device)
                ids[r, pos], mlm_labels[r, pos] = torch.from_numpy(shown).to(ids), torch.from_numpy(orig).to(ids)
        # Every position of the last block: output_hidden_states makes the first-token block take its full path
        recording = Recording(model, output_hidden_states=True)
        if apart:  # the source forward keeps the first-token last block; the target's head output is not read
            task, _ = self.task_loss(model, batch["train"])
            recording(**{k: v for k, v in masked.items() if k != "labels"} | {"input_ids": ids})
        else:
            task, _ = self.task_loss(recording, batch | {"input_ids": ids})
        keep = mlm_labels != -100
        if not keep.any():
            return LossOut(task, {"task": task.detach()})
        inner = getattr(model, "module", model)
        logits = self.head(recording.out.hidden_states[-1][keep], inner.get_input_embeddings().weight)
        per_token = F.cross_entropy(logits.float(), mlm_labels[keep], reduction="none")
        row_of = torch.arange(len(rows_m), device=ids.device)[:, None].expand_as(keep)[keep]
        sums = torch.zeros(len(rows_m), device=ids.device).index_add(0, row_of, per_token)
        per_row = sums / keep.sum(1).clamp_min(1)
        target = torch.tensor([r >= self.n_labelled for r in rows_m], device=ids.device)
        mlm = per_row[target].sum() * units["train"] / units["unlabelled"]
        return LossOut(task + self.weight * mlm, {"task": task.detach(), "mlm": mlm.detach()})

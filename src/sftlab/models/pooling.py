"""`model.pooling: mean`: the head reads the attention-masked mean of the last hidden states, not the first token.

Why: the packaged encoders are sentence-transformers checkpoints (minilm-l6 is all-MiniLM-L6-v2; the distillation
teacher all-mpnet-base-v2), trained so that the mean of the token states is the sentence embedding; their [CLS]
state and BERT's pooler (dense + tanh from next-sentence prediction) were never trained for it. Measured on SST-2
with 16 labels per class (seed 0), a logistic probe on frozen features: [CLS] 0.580, BERT's pooler 0.570, mean
0.657 (docs/fewshot.md). SetFit (Tunstall et al. 2022) trains and classifies that mean embedding, so its
contrastive step needs it.

How, for any architecture whose head reads position 0: the base model's forward is wrapped so that position 0 of
its last hidden states *is* the masked mean (padding excluded) and its pooler output, where it has one, is that mean
too. BERT's pooler is bypassed (the head reads the mean itself, as SetFit's logistic head does); its weights stay in
the checkpoint, unused and frozen (`unused_parameters`), so saved folders keep the class's layout and load with no
"newly initialized" noise. RoBERTa/MPNet/ELECTRA heads and DistilBERT's pre_classifier read position 0 and so the
mean. The choice is saved in config.json (`sftlab_pooling`) and sftlab.json (`pooling`, for adapter runs, whose
base is loaded from its name); every loader calls `apply_pooling` after `from_pretrained`. Exactness:
tests/unit/test_pooling.py (logits == the head on the masked mean computed by hand, padding-invariant, saved and
loaded, exported).

Pitfall: the last-block first-token shortcut (models/first_token.py) must be off: the head now reads every
position. The loop and the server skip it when pooling is mean (its probe would also refuse it).
"""
from __future__ import annotations

import types

import torch

from ..errors import ConfigError

CONFIG_KEY = "sftlab_pooling"


def _inner(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


def pooling_of(model) -> str:
    """'mean' if `model` (or the model it wraps) reads the masked mean, else 'first'."""
    return getattr(_inner(model).config, CONFIG_KEY, None) or "first"


def apply_pooling(model, pooling: str | None = None) -> bool:
    """Install `pooling` (None: what the model's config.json says) on an HF encoder with a head; True if the head
    now reads the mean. Idempotent."""
    inner = _inner(model)
    pooling = pooling or getattr(inner.config, CONFIG_KEY, None) or "first"
    if pooling == "first":
        return False
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if base is None or base is inner or getattr(inner.config, "is_decoder", False):
        raise ConfigError(f"model.pooling: mean needs an encoder with a head on top ({type(inner).__name__} has "
                          f"none); remove model.pooling")
    setattr(inner.config, CONFIG_KEY, "mean")
    if getattr(base, "_sftlab_mean", False):
        return True
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        pooler.forward = types.MethodType(lambda self, hidden_states: hidden_states[:, 0], pooler)
    base.forward = types.MethodType(_mean_forward(base.forward), base)
    base._sftlab_mean = True
    return True


def unused_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters a mean-pooling model never reads (BERT's pooler): freeze them after the strategy runs."""
    inner = _inner(model)
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if not getattr(base, "_sftlab_mean", False) or not isinstance(getattr(base, "pooler", None), torch.nn.Module):
        return []
    return list(base.pooler.parameters())


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    m = mask[:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _mean_forward(original):
    def forward(self, *args, **kwargs):
        out = original(*args, **kwargs)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        hidden = out[0]
        mean = masked_mean(hidden, mask)
        hidden = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
        if isinstance(out, tuple):  # return_dict=False: (last_hidden_state, pooler_output?, ...)
            rest = list(out[1:])
            if rest and getattr(self, "pooler", None) is not None:
                rest[0] = mean
            return (hidden, *rest)
        out["last_hidden_state"] = hidden
        if out.get("pooler_output") is not None:
            out["pooler_output"] = mean
        return out

    return forward

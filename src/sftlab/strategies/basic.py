"""Strategies that choose which existing parameters train: full, head_only, ffn_only, top_k_layers, bitfit, llrd.

The task head always trains. For our own strategies "head" means everything above the last block: the
parameters outside the backbone (`classifier.*`, an untied `lm_head`) plus the backbone's top (BERT's pooler,
a decoder's final norm). `head_only` with `strategy.head: linear` is the exception: a pure linear probe.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import strategies
from .anatomy import anatomy


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters outside `model.base_model` (e.g. BERT's `classifier.*`): what peft must save with an adapter."""
    prefix = getattr(model, "base_model_prefix", "")
    return {n for n, _ in model.named_parameters() if not (prefix and n.startswith(prefix + "."))}


def new_head(a, ctx) -> list[str]:
    """The head that must train: a classifier/regressor is new (random) and always trains. A decoder's `lm_head`
    is pretrained, not a task head: strategies that adapt part of a decoder leave it frozen, as peft's methods
    do (an untied lm_head is vocab x hidden: 525M parameters on Llama-3-8B). head_only/full train it."""
    return [] if ctx.task == "causal_lm" else a.head


def train_only(model: torch.nn.Module, names: set[str]) -> torch.nn.Module:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def _no_head_error(model, strategy: str) -> ConfigError:
    return ConfigError(
        f"strategy.name: {strategy}: {type(model).__name__} has no separate head to train (its output layer is tied "
        "to the input embeddings); use top_k_layers, ffn_only, lora or adapter"
    )


@strategies.register("full")
def full(model, cfg, ctx):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@strategies.register("llrd")
def llrd(model, cfg, ctx):
    """Full fine-tuning with layer-wise LR decay (ULMFiT's discriminative rates; ELECTRA's decay per block).
    The decay itself is `strategy.layer_decay`, applied by the optimizer for any strategy."""
    return full(model, cfg, ctx)


@strategies.register("head_only")
def head_only(model, cfg, ctx):
    """Frozen backbone. `head: linear` is a linear probe; `mlp` also trains the layers between the backbone and
    the head (BERT's pooler: dense + tanh), a one-hidden-layer MLP probe."""
    a = anatomy(model)
    names = set(a.head) | (set(a.top) if cfg.head == "mlp" else set())
    if not a.head:
        raise _no_head_error(model, "head_only")
    # a pooler is a dense layer (BERT's dense + tanh); a decoder's top is only its final norm
    if cfg.head == "mlp" and not any(p.ndim > 1 for n, p in model.named_parameters() if n in a.top):
        raise ConfigError(f"strategy.head: mlp needs a pooler between backbone and head, which "
                          f"{type(model).__name__} lacks; use strategy.head=linear")
    return train_only(model, names)


@strategies.register("ffn_only")
def ffn_only(model, cfg, ctx):
    """Only the feed-forward sublayers of every block, plus the head."""
    a = anatomy(model)
    if not a.ffn:
        raise ConfigError(f"strategy.name: ffn_only: no feed-forward sublayers found in {a.stack}; use lora")
    return train_only(model, set(a.ffn) | set(new_head(a, ctx)) | set(a.top))


@strategies.register("top_k_layers")
def top_k_layers(model, cfg, ctx):
    """Only the last `strategy.k` blocks, plus the head."""
    a = anatomy(model)
    if cfg.k > a.num_blocks:
        raise ConfigError(f"strategy.k: {cfg.k} but the model has {a.num_blocks} blocks; choose 1..{a.num_blocks}")
    names = {n for block in a.blocks[a.num_blocks - cfg.k:] for n in block}
    return train_only(model, names | set(new_head(a, ctx)) | set(a.top))


@strategies.register("bitfit")
def bitfit(model, cfg, ctx):
    """Only bias terms plus the parameters outside the backbone (Ben Zaken et al. 2022: "bias terms and the
    task-specific classification layer"); BERT's pooler weight stays frozen, its bias trains."""
    a = anatomy(model)
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")} - set(new_head(a, ctx))
    if not biases:
        raise ConfigError(f"strategy.name: bitfit: {type(model).__name__} has no bias terms (Llama-style models "
                          "have none); use lora or top_k_layers")
    return train_only(model, biases | set(new_head(a, ctx)))

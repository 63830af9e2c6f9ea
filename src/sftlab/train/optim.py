"""AdamW with decoupled weight decay off for biases and LayerNorm weights; warmup + linear/cosine decay."""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    # BERT/Llama convention: 1-D tensors are biases and norm scales; names catch 2-D norm params in odd models.
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_scale=None, include_frozen=False):
    """One group per (decay?, LR multiplier). `lr_scale(name)` is layer-wise decay; frozen parameters are
    included when they join later (gradual unfreezing: AdamW skips them while they have no gradient)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or include_frozen:
            key = (no_decay(name, p), lr_scale(name) if lr_scale else 1.0)
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if skip else weight_decay, "lr": lr * scale}
            for (skip, scale), ps in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0]))]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_scale=None, include_frozen=False):
    groups = param_groups(model, cfg.weight_decay, cfg.lr, lr_scale, include_frozen)
    # fused AdamW is the fastest CPU/GPU kernel in torch 2.13 (DESIGN.md: 133 vs 114 ex/s on minilm-l6).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused or None)


def build_schedule(optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

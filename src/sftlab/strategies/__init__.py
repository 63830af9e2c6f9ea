"""Strategies: how much of the model trains, chosen by `strategy.name` (PEFT's one-leaf-per-method layout).

A leaf is `fn(model, cfg, ctx) -> Plan` registered by name. Most only set `requires_grad`; peft methods wrap
the model; gradual unfreezing adds a per-step hook. Layer-wise LR decay (`strategy.layer_decay`) is not a
leaf's business: any strategy gets it from the anatomy map in the optimizer's parameter groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..registry import strategies
from .anatomy import Anatomy, anatomy, find_stack  # noqa: F401


@dataclass
class Plan:
    model: torch.nn.Module
    # Called with the number of the step about to run (0-based), before it; also on resume.
    on_step: Callable[[int], None] | None = None
    # The optimizer holds parameters that are frozen now but join later (gradual unfreezing).
    optimize_frozen: bool = False
    anatomy: Anatomy | None = None
    # The frozen base is never saved (an adapter folder reloads it from its source) and reaches the math only through
    # autocast-cast matmuls, so under bf16 autocast its Linear weights may be held in bf16 (precision.py).
    frozen_base_not_saved: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    task: str
    steps_per_epoch: int = 1
    max_length: int | None = None


def apply_strategy(model: torch.nn.Module, cfg, ctx: Context) -> Plan:
    """Runs the leaf named by `cfg.name` on `model`; the anatomy is read before any wrapping."""
    needs_map = cfg.layer_decay is not None or cfg.name in ("llrd", "gradual_unfreezing")
    amap = anatomy(model) if needs_map else None
    out = strategies.get(cfg.name)(model, cfg, ctx)
    plan = out if isinstance(out, Plan) else Plan(out)
    plan.anatomy = plan.anatomy or amap
    if not any(p.requires_grad for p in plan.model.parameters()) and not plan.optimize_frozen:
        from ..errors import ConfigError

        raise ConfigError(f"strategy.name: {cfg.name} leaves nothing to train in this model; choose another strategy")
    return plan


def layer_scale(plan: Plan, decay: float | None) -> Callable[[str], float] | None:
    """LR multiplier per parameter name: decay ** (num_blocks + 1 - layer id), so the head gets the full LR."""
    if decay is None or plan.anatomy is None:
        return None
    top = plan.anatomy.num_blocks + 1
    return lambda name: decay ** (top - plan.anatomy.layer_id(name))


from . import adapter, basic, gradual, peft_methods  # noqa: E402,F401  (registers the leaves)
from .basic import head_parameter_names  # noqa: E402,F401

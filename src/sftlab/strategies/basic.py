"""`full` and `head_only`. The task head (everything outside the backbone) always trains."""
from __future__ import annotations

import torch

from ..registry import strategies


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters outside `model.base_model` (e.g. BERT's `classifier.*`): the task head."""
    prefix = getattr(model, "base_model_prefix", "")
    return {n for n, _ in model.named_parameters() if not (prefix and n.startswith(prefix + "."))}


@strategies.register("full")
def full(model, cfg):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@strategies.register("head_only")
def head_only(model, cfg):
    """Linear probe: frozen backbone, trained head."""
    head = head_parameter_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    return model

"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), our own small module.

AdapterHub's `adapters` pins transformers 4.x, so it cannot load next to transformers 5. An adapter is
`y + up(act(down(y)))` applied to a sublayer's output projection `y`, before the residual add: Houlsby after
the attention and the feed-forward sublayers, Pfeiffer after the feed-forward only. `up` starts at zero, so
the adapted model starts as the base model. Adapters attach by forward hooks and live in `model.sftlab_adapters`,
so base parameter names stay as they are; RUN_DIR/best holds only what trained (adapters + head) and
`sftlab_adapter.json`, and `load_adapter` rebuilds the model on its base.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..registry import strategies
from .anatomy import anatomy, sublayer_outputs
from .basic import new_head, train_only

CONFIG_FILE, WEIGHTS_FILE = "sftlab_adapter.json", "adapter_model.safetensors"


class Bottleneck(nn.Module):
    def __init__(self, width: int, reduction: int):
        super().__init__()
        hidden = max(1, width // reduction)
        self.down, self.act, self.up = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.act(self.down(y)))


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")  # ModuleDict keys cannot contain dots


def inject(model: nn.Module, kind: str, reduction: int) -> list[str]:
    """Adds adapters after the chosen sublayer outputs; returns their module names."""
    targets = sublayer_outputs(model, ("attn", "ffn") if kind == "houlsby" else ("ffn",))
    modules = dict(model.named_modules())
    bank = nn.ModuleDict()
    for name in targets:
        out = modules[name]
        width = out.out_features if hasattr(out, "out_features") else out.weight.shape[-1]  # GPT-2 Conv1D
        bank[_key(name)] = adapter = Bottleneck(width, reduction).to(out.weight.device, out.weight.dtype)
        out.register_forward_hook(lambda mod, args, y, a=adapter: a(y))
    model.sftlab_adapters = bank
    model.sftlab_adapter_config = {"kind": kind, "reduction": reduction, "targets": targets}
    return targets


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, folder: Path) -> None:
    save_file(trained_state(model), str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model.sftlab_adapter_config | {"trained": sorted(trained_state(model))},
                                                 indent=2))


def load_adapter(base: nn.Module, folder: Path) -> nn.Module:
    """Injects the saved adapters into `base` and loads adapters + head; every saved tensor must land."""
    cfg = json.loads((Path(folder) / CONFIG_FILE).read_text())
    inject(base, cfg["kind"], cfg["reduction"])
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    params = dict(base.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"{folder}: adapter weights do not fit the base model ({', '.join(missing[:3])})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return base


@strategies.register("adapter")
def adapter(model, cfg, ctx):
    a = anatomy(model)
    inject(model, cfg.adapter_type, cfg.reduction)
    names = {n for n, _ in model.named_parameters() if n.startswith("sftlab_adapters.")}
    return train_only(model, names | set(new_head(a, ctx)) | set(a.top))

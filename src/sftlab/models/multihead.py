"""Several task heads on one encoder, behind a switch in place of the model's own head (task: multitask).

Why a switch inside the Hugging Face model rather than a new wrapper model: everything that handles an ordinary
sequence classifier keeps working on it unchanged: the strategies (the head is still `classifier.*`), PEFT (LoRA's
`modules_to_save` copies the switch with its heads), the first-token last block (the heads read what the original
head read), `save_pretrained` (keys `classifier.heads.NAME.*`). The active head is chosen per forward by
`active_head(model, k)`; tasks/multitask.py's loss and evaluation do it from the batch's task index.

Head k > 0 is the first head's architecture with the last linear layer sized for task k, initialised as
transformers initialises a new head (normal(0, initializer_range), zero bias), from a generator forked off the
run's seed, so adding tasks never moves the run's dropout masks. Head 0 is the head `from_pretrained` built, which
makes a one-task mixture the single-task run bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn


ALL = -1  # active = ALL: every head on the one encoder pass, outputs side by side (exported graphs: one pass, any task)


class HeadSwitch(nn.Module):
    def __init__(self, heads: dict[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.names = list(heads)
        self.active = 0

    def forward(self, *args, **kwargs):
        if self.active == ALL:
            return torch.cat([head(*args, **kwargs) for head in self.heads.values()], -1)
        return self.heads[self.names[self.active]](*args, **kwargs)


def columns(heads) -> dict[str, slice]:
    """Each head's columns in the ALL output: classes, or 1 for regression, in head order."""
    out, at = {}, 0
    for h in heads:
        n = 1 if h.kind == "regression" else len(h.labels)
        out[h.name], at = slice(at, at + n), at + n
    return out


def _head_name(model: nn.Module) -> str:
    """The attribute holding the head: the first child with parameters outside the encoder (BERT's `classifier`)."""
    from ..errors import ConfigError

    base = getattr(model, "base_model_prefix", None)
    for name, child in model.named_children():
        if name != base and any(True for _ in child.parameters()):
            return name
    raise ConfigError("task: multitask needs an encoder with a classification head after it (e.g. BERT, MPNet)")


def _sized(head: nn.Module, outputs: int, std: float, seed: int) -> nn.Module:
    new = copy.deepcopy(head)
    last_name, last = [(n, m) for n, m in new.named_modules() if isinstance(m, nn.Linear)][-1]
    resized = nn.Linear(last.in_features, outputs, bias=last.bias is not None)
    if last_name:
        parent = new.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else new
        setattr(parent, last_name.rsplit(".", 1)[-1], resized)
    else:
        new = resized
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in new.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return new


def install_heads(model: nn.Module, heads, folder: str | Path | None = None) -> None:
    """Put every task's head behind a switch in place of the model's head; with a multitask folder, load them."""
    name = _head_name(model)
    first = getattr(model, name)
    std = float(getattr(model.config, "initializer_range", 0.02))
    seed = torch.initial_seed()
    modules = {}
    for k, h in enumerate(heads):
        outputs = 1 if h.kind == "regression" else len(h.labels)
        # (the generator takes a signed 64-bit seed; an unseeded process's initial seed can be any 64-bit value)
        modules[h.name] = first if k == 0 else _sized(first, outputs, std, (seed * 1009 + k) % 2**63)
    switch = HeadSwitch(modules)
    setattr(model, name, switch)
    weights = Path(folder) / "model.safetensors" if folder else None
    if weights is not None and weights.is_file():
        from safetensors import safe_open

        prefix = f"{name}.heads."
        with safe_open(str(weights), "pt") as f:
            saved = {k[len(name) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        for h in heads:  # a multitask run's folder: its trained heads by name (an ordinary folder has none)
            mine = {k[len(f"heads.{h.name}."):]: v for k, v in saved.items() if k.startswith(f"heads.{h.name}.")}
            if mine:
                switch.heads[h.name].load_state_dict(mine, strict=True)


def switches(model: nn.Module) -> list[HeadSwitch]:
    return [m for m in model.modules() if isinstance(m, HeadSwitch)]


@contextlib.contextmanager
def active_head(model: nn.Module, k: int):
    """Route the model's head calls to task k's head (every switch: PEFT keeps a trainable copy beside the
    original)."""
    found = switches(model)
    before = [s.active for s in found]
    for s in found:
        s.active = k
    try:
        yield
    finally:
        for s, b in zip(found, before):
            s.active = b


def saved_heads(folder: str | Path) -> list | None:
    """The heads of a multitask run's model folder (its sftlab.json), or None for any other folder."""
    import json

    from ..tasks.multitask import Head

    try:
        meta = json.loads((Path(folder) / "sftlab.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("task") != "multitask":
        return None
    return [Head.from_json(h) for h in meta["labels"]]


def check_head_from(cfg) -> None:
    """model.head_from before anything is written: the start is a multitask run's folder holding that head, of
    this run's kind."""
    from ..errors import ConfigError
    from .load import resolve_model

    name = cfg.model.head_from
    if name is None:
        return
    heads = saved_heads(resolve_model(cfg.model.name))
    if heads is None:
        raise ConfigError(f"model.head_from: {name} takes a head of a multitask run; model.name {cfg.model.name} is "
                          "not one (point it at RUN_DIR/best of a task: multitask run)")
    found = {h.name: h for h in heads}
    if name not in found:
        raise ConfigError(f"model.head_from: {cfg.model.name} has no head {name!r}; its heads: {', '.join(found)}")
    if found[name].kind != cfg.task:
        raise ConfigError(f"model.head_from: head {name} is a {found[name].kind} head, this run is task {cfg.task}; "
                          "pick a head of the same kind or drop model.head_from")


def take_head(model: nn.Module, folder: str | Path, name: str, labels: list[str] | None) -> None:
    """Start `model`'s own head from head `name` of a multitask folder (same kind and classes, checked)."""
    from safetensors import safe_open

    from ..errors import ConfigError

    head = {h.name: h for h in saved_heads(folder)}[name]
    if labels is not None and head.labels != list(labels):
        raise ConfigError(f"model.head_from: head {name} was trained for labels {head.labels}, this data has "
                          f"{list(labels)}; set data.labels to {head.labels} (same order) or drop model.head_from")
    attr = _head_name(model)
    prefix = f"{attr}.heads.{name}."
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    getattr(model, attr).load_state_dict(weights, strict=True)

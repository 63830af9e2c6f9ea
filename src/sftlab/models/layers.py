"""`model.keep_layers`: a shallower student initialised from chosen blocks of a pretrained model.

DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version of BERT", section 3) initialises its 6-layer student
from every other layer of the 12-layer teacher; taking blocks from the same model keeps the embeddings, head and the
kept blocks' weights as trained, which the paper found matters as much as the distillation loss. The pitfall this
file handles: transformers' decoders number their attention layers (`layer_idx`, used by the KV cache) and some
configs list a per-layer attention type (`layer_types`); both must follow the blocks, or generation reads the wrong
cache slots after pruning.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..strategies.anatomy import find_stack

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_keep(keep: list[int], n: int, name: str) -> None:
    """One line naming the key when `keep` cannot be a selection of a model with `n` blocks."""
    if not keep:
        raise ConfigError("model.keep_layers: empty; list the blocks to keep, e.g. [1, 3, 5]")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ConfigError(f"model.keep_layers: {bad} out of range; {name} has {n} blocks (0..{n - 1})")
    if list(keep) != sorted(set(keep)):
        raise ConfigError(f"model.keep_layers: {list(keep)} must be increasing without repeats (blocks run in "
                          f"order), e.g. {sorted(set(keep))}")


def keep_layers(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Drops every block not in `keep` (in place) and updates the config, so `save_pretrained` writes a model
    that loads as the smaller one. The kept blocks are the same module objects: their tensors are the original's."""
    stack_name, stack = find_stack(model)
    check_keep(keep, len(stack), type(model).__name__)
    kept = torch.nn.ModuleList([stack[i] for i in keep])
    parent_name, _, attr = stack_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, kept)
    for j, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    for config in {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c}.values():
        for key in LAYER_COUNT_KEYS:
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, len(keep))
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(stack):
            config.layer_types = [types[i] for i in keep]
    return model

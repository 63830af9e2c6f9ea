"""train.distributed.strategy: fsdp. PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, torch >= 2.6): each
transformer block, then the root, becomes a unit whose parameters are DTensors sharded over the processes;
forward and backward all-gather one unit at a time and reduce-scatter its gradients (averaged, as DDP's are).

Why FSDP2 by hand and not accelerate's FSDP plugin: accelerate routes FSDP through its GPU distributed types, and
sftlab's CPU runs (gloo) are where the equation tests live; `fully_shard` runs on both. Pitfalls, each handled
here: the optimizer must be built on the sharded parameters (new Parameter objects), so sharding comes before
build_optimizer; state dicts of DTensors are gathered collectively (every rank calls, rank 0 keeps the full
tensors) so checkpoints and best/ are the same files a single process writes, and any process count resumes them;
evaluation runs the same batches on every rank, as the gathers need.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def check(cfg, model) -> None:
    """What FSDP here cannot do, refused before the first step with the key to change."""
    if cfg.strategy.name != "full":
        raise ConfigError(f"train.distributed.strategy: fsdp trains strategy.name full for now (got "
                          f"{cfg.strategy.name}: adapters are small enough for ddp, which is the default)")
    if cfg.train.auto_batch_size:
        raise ConfigError("train.auto_batch_size works in one process; set train.batch_size by hand under fsdp")
    if cfg.train.distributed.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("train.distributed.cpu_offload moves shards from GPU to CPU memory; this machine has no "
                          "GPU (the parameters are in CPU memory already): drop it")
    wrap = cfg.train.distributed.wrap or list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    missing = [w for w in wrap if w not in present]
    if cfg.train.distributed.wrap and missing:
        blocks = list(getattr(model, "_no_split_modules", None) or []) or sorted(c for c in present
                                                                                 if c.endswith(("Layer", "Block")))
        raise ConfigError(f"train.distributed.wrap: {', '.join(missing)} is not a module class of "
                          f"{cfg.model.name} (its transformer blocks: {', '.join(blocks[:4]) or 'none found'})")


def shard(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """fully_shard the wrap classes (the model's transformer blocks by default), then the root; in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    dist = cfg.train.distributed
    wrap = set(dist.wrap or getattr(model, "_no_split_modules", None) or [])
    kwargs = {"offload_policy": CPUOffloadPolicy()} if dist.cpu_offload else {}
    for module in list(model.modules())[1:]:
        if type(module).__name__ in wrap:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0 (CPU tensors), empty elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """torch's optimizer.state_dict() format (parameters by index in param_groups order), gathered on rank 0, so
    a checkpoint holds the same optimizer file a single process writes; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    index = _fqn_index(model, optimizer)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[f] for f in g["params"]]}
              for g in osd.get("param_groups", [])]
    return {"state": {index[fqn]: s for fqn, s in osd.get("state", {}).items()}, "param_groups": groups}


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    """Every rank loads the full tensors (read from the checkpoint files) into its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options(strict=False))
    if optimizer_state is not None:
        fqn = {i: f for f, i in _fqn_index(model, optimizer).items()}
        osd = {"state": {fqn[i]: s for i, s in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, osd, options=_options())


def _fqn_index(model, optimizer) -> dict[str, int]:
    """Parameter name -> its index in optimizer.state_dict() (the order of param_groups)."""
    name = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    return {name[id(p)]: i for i, p in enumerate(order)}


def grad_norm(params, max_norm: float | None) -> torch.Tensor:
    """Clip (when max_norm) and return the total gradient norm over all shards, as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm or float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def nonfinite_params(model) -> list[str]:
    """Names of parameters with NaN/inf in this rank's shards; when any rank has one, every rank returns a
    non-empty list (so all of them stop together instead of waiting for each other)."""
    named = [(n, p.to_local()) for n, p in model.named_parameters()]
    bad = [n for n, p in named if p.numel() and not bool(torch.isfinite(p).all())]
    flag = torch.tensor(float(bool(bad)), device="cuda" if torch.cuda.is_available() else "cpu")  # nccl: on GPU
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bad or (["a shard on another process"] if flag.item() else [])

"""train.distributed.strategy: deepspeed. DeepSpeed's ZeRO stage 2 (optimizer state and gradients partitioned over
the processes) or stage 3 (parameters too, gathered a block at a time for forward and backward): Rajbhandari et al.
2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models". The engine is DeepSpeed's own
(`deepspeed.initialize`); sftlab's loop still chooses the rows of every micro-batch and scales each loss, so a step
sees exactly what a DDP step sees:

- accumulation: the loop marks the step's last micro-batch as DeepSpeed's accumulation boundary
  (`set_gradient_accumulation_boundary`) and passes losses already divided by the step's units
  (`backward(scale_wrt_gas=False)`), so DeepSpeed's own `gradient_accumulation_steps` stays 1 and unused;
- clipping and the update: `engine.step()` clips at train.max_grad_norm and steps the client AdamW (sftlab's, with
  its groups and learning-rate schedule, which the loop steps); DeepSpeed skips the update itself when the gradient
  norm is not finite (fp32 weights; ZeRO's overflow check) and the loop then leaves the schedule where it was;
- precision: the engine holds fp32 weights and the loop's bf16 autocast runs the matmuls, as under DDP (DeepSpeed's
  own bf16 mode keeps bf16 weights: other numbers than every other strategy's);
- state: checkpoints and best/ hold the *full* fp32 weights and AdamW moments, gathered from the partitions with
  DeepSpeed's `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` into torch's own optimizer format, the
  files one process writes, never DeepSpeed's pickled checkpoints (we never unpickle). Any process count and any
  strategy resumes them; resuming here loads the weights before `initialize` and the moments after it.

Pitfalls: ZeRO-3's forward gathers parameters collectively, so every rank runs as many passes as the busiest one
(the loop's zero-weighted fillers, as for FSDP) and evaluation runs on every rank; DeepSpeed's CPU accelerator
talks gloo when oneCCL is absent (how the equation tests run it on this machine's CPUs).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def check(cfg) -> None:
    """What this integration cannot do, refused before the first step with the key to change."""
    d = cfg.train.distributed
    if cfg.strategy.name != "full":
        raise ConfigError(f"train.distributed.strategy: deepspeed trains strategy.name full for now (got "
                          f"{cfg.strategy.name}: adapters are small enough for ddp, which is the default)")
    if cfg.train.auto_batch_size:
        raise ConfigError("train.auto_batch_size works in one process; set train.batch_size by hand under deepspeed")
    if d.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("train.distributed.cpu_offload moves ZeRO's partitions from GPU to CPU memory; this "
                          "machine has no GPU (they are in CPU memory already): drop it")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # (imported by wrap(), quietly)
        raise ConfigError("train.distributed.strategy: deepspeed needs the deepspeed package; install the version "
                          "in requirements.lock (pip install -c requirements.lock deepspeed)")


def ds_config(cfg) -> dict:
    """The DeepSpeed config: ZeRO stage and offload from train.distributed, clipping from train.max_grad_norm."""
    d, t = cfg.train.distributed, cfg.train
    zero: dict = {"stage": d.zero_stage or 2}
    if d.cpu_offload:  # the optimizer (stage 2 and 3) and the parameters (stage 3) live in CPU memory
        zero["offload_optimizer"] = {"device": "cpu"}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": float(t.max_grad_norm or 0.0), "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW (sftlab's groups)
            "zero_force_ds_cpu_optimizer": False,   # offload steps that AdamW on the CPU rather than DeepSpeedCPUAdam
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg):
    """The DeepSpeed engine around `model` and `optimizer` (already resumed, if the run resumes: their loaded
    weights become ZeRO's fp32 partitions, and the loaded AdamW moments are moved into them here)."""
    import contextlib
    import logging
    import os
    import sys
    import warnings

    # Quiet by default: the accelerator named (not guessed with a warning per process), DeepSpeed's INFO lines off,
    # its op-build print() kept off stdout (sftlab's stdout is the run directory, which scripts read), and the
    # deprecation warnings its all-gather and reduce-scatter raise on torch 2.13 filtered.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce with g++ on first use (~50 s on a fresh
        # machine, and a compiler every CI runner must have) for speed on CPU-only clusters, which sftlab's CPU runs
        # (tests, laptops) do not need: gloo's all-reduce instead. (deepspeed.comm.torch, 0.19.8)
        import importlib

        ds_torch = importlib.import_module("deepspeed.comm.torch")  # (`import ... as` would bind torch itself:
        if hasattr(ds_torch, "build_shm_op"):                        # deepspeed.comm re-exports it as `torch`)
            ds_torch.build_shm_op = lambda: None
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    # ZeRO replaces each group's parameters with a flat partition: keep the parameters in torch's state-index order
    # (checkpoint.py reads `sftlab_params` to know which weights train) and each group's count
    order = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.sftlab_params, optimizer.sftlab_group_sizes = order, [len(g["params"]) for g in optimizer.param_groups]
    loaded = {i: dict(optimizer.state[p]) for i, p in enumerate(order) if p in optimizer.state}
    optimizer.state.clear()  # keyed by the parameters ZeRO is about to replace
    with contextlib.redirect_stdout(sys.stderr):  # ("DeepSpeed ... built successfully": its JIT-built comm op)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg),
                                          dist_init_required=False)
    _init_state(engine, next(iter(loaded.values()))["step"] if loaded else None)
    if loaded:
        _load_moments(engine, loaded)
    return engine


def _flat_partitions(engine) -> list[torch.Tensor]:
    zo = engine.optimizer
    return list(getattr(zo, "fp32_partitioned_groups_flat", None) or zo.single_partition_of_fp32_groups)


def _init_state(engine, step: torch.Tensor | None) -> None:
    """AdamW's state for every flat partition now, as its first step would make it (step 0, zero moments), or at
    a resumed step. Why: torch's AdamW creates it lazily, group by group, while ZeRO-2 links each parameter's view
    into it after the *first* group's update, so with two groups (decay, no decay) the second group's views were
    never made ("exp_avg not found in optimizer state fragment" at the first checkpoint; DeepSpeed 0.19.8)."""
    inner, zo = engine.optimizer.optimizer, engine.optimizer
    for flat in _flat_partitions(engine):
        inner.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device) if step is None else
                             step.detach().clone().to(torch.float32), "exp_avg": torch.zeros_like(flat),
                             "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zo, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2: the views, now that the state exists
        zo._lazy_init_hp_params_optimizer_state()


def _load_moments(engine, loaded: dict[int, dict]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    for i, p in enumerate(engine.optimizer.optimizer.sftlab_params):
        for key in ("exp_avg", "exp_avg_sq"):
            if i in loaded:
                safe_set_full_optimizer_state(p, loaded[i][key].to(torch.float32), key)


def step(engine) -> tuple[torch.Tensor, bool]:
    """DeepSpeed's clip and update at the accumulation boundary: (gradient norm before clipping, whether it
    updated). Every rank gets the same answer (the norm is all-reduced inside)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = torch.as_tensor(float("inf") if norm is None else float(norm))
    return norm, bool(torch.isfinite(norm))


def full_model_state(engine) -> dict[str, torch.Tensor]:
    """The state dict's names (tied ones too) with each parameter's full fp32 value and the saved buffers, on every
    rank; every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    full: dict[int, torch.Tensor] = {}
    for p in module.parameters():  # frozen parameters have no fp32 partition: their own (gathered) value
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        full[id(p)] = (value if value is not None else _gathered(p)).detach().cpu()
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    return {n: full[id(params[n])] if n in params else buffers[n].detach().cpu() for n in module.state_dict()}


def _gathered(p: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed

    if hasattr(p, "ds_id"):  # ZeRO-3 partitions frozen parameters too
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().cpu().clone()
    return p.detach().cpu().clone()


def full_optimizer_state(engine, optimizer) -> dict:
    """torch's optimizer.state_dict() format (parameters by index in param_groups order), the same on every rank;
    every rank must call it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = engine.optimizer.optimizer  # == optimizer, whose groups now hold the flat partitions
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    state = {}
    if steps:  # (none before the first update)
        for i, p in enumerate(optimizer.sftlab_params):
            if p.requires_grad:
                state[i] = {"step": steps[0].clone(),
                            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").cpu(),
                            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").cpu()}
    index, groups = 0, []
    for g, n in zip(optimizer.param_groups, optimizer.sftlab_group_sizes):
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(index, index + n))})
        index += n
    return {"state": state, "param_groups": groups}


def nonfinite_params(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]

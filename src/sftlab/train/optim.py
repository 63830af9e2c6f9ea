"""AdamW with decoupled weight decay off for biases and LayerNorm weights; warmup + linear/cosine decay."""
from __future__ import annotations

import math
import mmap

import numpy as np
import torch

from ..config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    # BERT/Llama convention: 1-D tensors are biases and norm scales; names catch 2-D norm params in odd models.
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def lazy_embedding(model: torch.nn.Module) -> torch.Tensor | None:
    """The input word-embedding matrix when rows can update lazily: not tied to the output layer (a tied matrix
    gets a dense gradient from the LM head, so every row is touched anyway)."""
    try:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if emb is None or (out is not None and out.weight is emb.weight):
        return None
    return emb.weight


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_scale=None, include_frozen=False,
                 lazy: torch.Tensor | None = None):
    """One group per (decay?, LR multiplier, lazy rows?). `lr_scale(name)` is layer-wise decay; frozen
    parameters are included when they join later (gradual unfreezing: AdamW skips them while they have no
    gradient); `lazy` is a matrix whose untouched rows are skipped (see LazyRowAdamW)."""
    groups: dict[tuple[bool, float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or include_frozen:
            key = (no_decay(name, p), lr_scale(name) if lr_scale else 1.0, p is lazy)
            groups.setdefault(key, []).append(p)
    out = []
    for (skip, scale, is_lazy), ps in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0], kv[0][2])):
        group = {"params": ps, "weight_decay": 0.0 if skip else weight_decay, "lr": lr * scale}
        if is_lazy:
            group["lazy_rows"] = True
        out.append(group)
    return out


class LazyRowAdamW(torch.optim.AdamW):
    """AdamW whose `lazy_rows` groups update only the rows with a non-zero gradient (TF's LazyAdam).

    minilm-l6's word-embedding matrix is 30,522 x 384 = 11.7M of its 22.7M parameters, and a batch touches a few
    hundred rows: dense AdamW spends about a third of each step on rows whose gradient is zero (DESIGN.md).
    Touched rows get exactly AdamW's update (same step count, bias correction, decoupled decay); untouched rows
    and their moments stay as they are, where dense AdamW would keep moving them by their old momentum and decay.
    State keys match AdamW's, so checkpoints and resume work unchanged."""

    @torch.no_grad()
    def step(self, closure=None):
        lazy = [(g, p, p.grad) for g in self.param_groups if g.get("lazy_rows") for p in g["params"]
                if p.grad is not None]
        for _, p, _ in lazy:
            p.grad = None  # the dense kernel skips parameters without a gradient
        loss = super().step(closure)
        self.grad_scale = None  # set per step by clip_grad_norm; never carried into the next
        for group, p, grad in lazy:
            p.grad = grad
            self._rows_update(group, p, grad)
        return loss

    def _rows_update(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = _untouched_zeros(p)
            state["exp_avg_sq"] = _untouched_zeros(p)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if grad.is_sparse:  # an nn.Embedding(sparse=True) gradient: (token rows, values), no dense matrix at all
            grad = grad.coalesce()
            rows, g = grad.indices()[0], grad.values()
            keep = g.any(dim=1)  # e.g. the padding row: looked up, zero gradient - skipped as the dense path does
            rows, g = rows[keep], g[keep]
        else:
            rows = grad.any(dim=1).nonzero().squeeze(1)
            g = grad.index_select(0, rows)
        m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        w = p.index_select(0, rows).mul_(1 - lr * wd)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        p.index_copy_(0, rows, w.addcdiv_(m, denom, value=-lr / (1 - beta1**step)))


def _untouched_zeros(p: torch.Tensor) -> torch.Tensor:
    """Zeros like `p` that cost no memory until written, on CPU: a fresh anonymous mapping is zero pages that become
    resident only where a batch's rows are written (torch.zeros writes every page). Not numpy's calloc: numpy asks
    for transparent huge pages on large arrays (madvise), so writing one 1.5 KB row made a whole 2 MB page
    resident - the two moments of minilm-l6's 30,522 x 384 embedding took 61 MB after the first step's 62 rows.
    MADV_NOHUGEPAGE keeps 4 KB pages even where THP is set to `always`."""
    if p.device.type != "cpu" or p.dtype != torch.float32 or p.numel() == 0:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    buf = mmap.mmap(-1, p.numel() * 4)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(p.shape))


def sparse_embedding_gradients(model: torch.nn.Module) -> bool:
    """Lets the lazily updated embedding produce a row-sparse gradient (nn.Embedding(sparse=True)): its backward
    then never builds, zeroes and scatters into a dense vocab x hidden matrix, which on minilm-l6 costs more than
    the optimizer step over it. Returns whether it did."""
    weight = lazy_embedding(model)
    emb = model.get_input_embeddings() if weight is not None else None
    if emb is None or not isinstance(emb, torch.nn.Embedding) or not weight.requires_grad:
        return False
    emb.sparse = True
    return True


def clip_grad_norm(parameters, max_norm: float, optimizer=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same coefficient: max_norm / (norm + 1e-6), at most 1) that also takes
    sparse gradients, which torch's version refuses. With a fused `optimizer` the dense gradients are not touched
    here: the fused AdamW kernel divides each gradient by `grad_scale` as it reads it (the hook torch's GradScaler
    uses), which saves a read-and-write pass over every gradient (~3 ms of a 160 ms minilm-l6 step)."""
    params = [p for p in parameters if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    dense = [p.grad for p in params if not p.grad.is_sparse]
    norms = list(torch._foreach_norm(dense)) if dense else []
    norms += [torch.linalg.vector_norm(p.grad.values()) for p in params if p.grad.is_sparse]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if optimizer is not None and optimizer.defaults.get("fused"):
        optimizer.grad_scale = coef.reciprocal()
    elif dense:
        torch._foreach_mul_(dense, coef)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad * coef
    return total


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_scale=None, include_frozen=False):
    lazy = lazy_embedding(model) if cfg.lazy_embeddings else None
    groups = param_groups(model, cfg.weight_decay, cfg.lr, lr_scale, include_frozen, lazy)
    # fused AdamW is the fastest CPU/GPU kernel in torch 2.13 (DESIGN.md: 133 vs 114 ex/s on minilm-l6).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    cls = LazyRowAdamW if any(g.get("lazy_rows") for g in groups) else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused or None)


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

"""What the domain-adaptation objectives (mmd.py, dann.py) share: the features the head reads, the two streams of a
micro-batch, a multi-kernel MMD and gradient reversal.

Both objectives train on a labelled source stream (`data.train`) and an unlabelled target stream (`data.unlabelled`,
the target domain's text). The loop puts rows of both streams in every micro-batch in the step's proportion
(batches.paired_micro_batches). The objectives here say `streams_apart`, so the loop collates each stream's rows of
a micro-batch on their own and they run as two forwards, each padded to its own longest row; the features of both
feed one loss and one backward. Why not one joined forward (which the loop still does for a micro-batch holding a
single stream): the joined batch pads every row to the longer stream's width, and with length-grouped batches on
both streams that wasted a third of the target side's tokens (books -> kitchen at 128 tokens: an MMD step cost
2.3x an SFT step joined; benchmarks/adapt_step.py, docs/performance.md). Per-micro-batch statistics (MMD, and the domain classifier's batch) make
these objectives depend on how a step is split into micro-batches, as BatchNorm does: "2 processes == 1" and
"batch 8 x accum 1 == 2 x 4" hold only at weight 0, where they are plain SFT (tested bit for bit); resume is exact
for any weight (tested).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def check_streams(cfg, name: str) -> None:
    """The target stream exists and is not the training file itself."""
    from pathlib import Path

    from ..data.examples import resolve_path

    d = cfg.data
    if d.unlabelled is None:
        raise ConfigError(f"objective.name: {name} adapts to a target domain: set data.unlabelled to its text "
                          "(a file or a list of files; labels, if any, are ignored)")
    if cfg.task not in ("classification", "regression"):
        raise ConfigError(f"objective.name: {name} is for task classification or regression, not {cfg.task}")
    files = [d.unlabelled] if isinstance(d.unlabelled, str) else list(d.unlabelled)
    train = Path(resolve_path(d, d.train)).resolve()
    for f in files:
        if Path(resolve_path(d, f)).resolve() == train:
            raise ConfigError(f"data.unlabelled: {f} is the training file; the target stream must be the target "
                              "domain's text (another file)")


def head_module(model) -> torch.nn.Module:
    """The first module with parameters outside the encoder (BERT's `classifier`, DistilBERT's `pre_classifier`,
    RoBERTa's `classifier` head), through DDP and PEFT wrappers."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    base = getattr(inner, "base_model_prefix", None)
    for name, child in inner.named_children():
        if name != base and any(True for _ in child.parameters()):
            return child
    raise ConfigError("objective: this model has no head module after its encoder to read features from")


class HeadInput:
    """Records the features the head reads during one call (the [CLS] position when it is given a sequence)."""

    def __init__(self, model):
        self.module, self.value, self.three_d = head_module(model), None, False

    def __enter__(self):
        def grab(_, args):
            x = args[0]
            self.value, self.three_d = (x[:, 0] if x.dim() == 3 else x), x.dim() == 3

        self.handle = self.module.register_forward_pre_hook(grab)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def features(task_loss, model, batch: dict, rows: list[int], n_labelled: int):
    """(task loss sum on the source rows, source features, target features) of one micro-batch: the head's input
    (HeadInput) from two forwards when the loop collated the streams apart ({"train": ..., "unlabelled": ...}), else
    from the one joined forward; a side without rows has features None."""
    if "unlabelled" in batch:
        with HeadInput(model) as source:
            task, _ = task_loss(model, batch["train"])
        with HeadInput(model) as target:  # (the head's own output on these rows is not read: a few FLOPs)
            model(**{k: v for k, v in batch["unlabelled"].items() if k != "labels"})
        return task, source.value, target.value
    with HeadInput(model) as joined:
        task, _ = task_loss(model, batch)
    mask = streams(rows, n_labelled, task.device)
    pick = lambda m: joined.value[m] if m.any() else None  # noqa: E731
    return task, pick(~mask), pick(mask)


def streams(rows: list[int], n_labelled: int, device) -> torch.Tensor:
    """Boolean [rows]: True for rows of the target (unlabelled) stream."""
    return torch.tensor([r >= n_labelled for r in rows], device=device)


def mmd2(x: torch.Tensor, y: torch.Tensor, multipliers=(0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared maximum mean discrepancy between samples x [n, d] and y [m, d] (n != m allowed) under a sum of
    Gaussian kernels (DAN, Long et al. 2015, "Learning Transferable Features with Deep Adaptation Networks"):
    bandwidths are the joint sample's mean pairwise squared distance times `multipliers`, with its gradient (so the
    kernels, hence MMD, are invariant to a common scale of the features: a detached bandwidth made every gradient
    say "shrink all features", which collapsed the classifier's input on the reviews). The biased
    V-statistic: >= 0, symmetric, 0 for identical samples (the unbiased one can go negative on small batches)."""
    z = torch.cat([x, y]).float()
    # Centred first: distances are unchanged, but |z|^2 - 2 z.z' + |z'|^2 no longer cancels large norms (a tiny or
    # saturated encoder's features sit close together far from 0, where fp32 rounding moved MMD by ~1%).
    z = z - z.mean(0, keepdim=True)
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    n, total = len(x), len(z)
    bandwidth = (d2.sum() / max(total * total - total, 1)).clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (bandwidth * m)) for m in multipliers)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficient: float):
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by -coefficient (Ganin & Lempitsky 2015)."""
    return _Reverse.apply(x, coefficient)


def model_width(cfg) -> int:
    """Hidden size of cfg.model (BERT's hidden_size, DistilBERT's dim, T5's d_model): the width of the features the
    head reads, for extras built before the model loads (DANN's classifier, UDALM's MLM head, GAN-BERT's generator)."""
    from transformers import AutoConfig

    from ..models import resolve_model

    mc = AutoConfig.from_pretrained(resolve_model(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    return next(getattr(mc, k) for k in ("hidden_size", "dim", "d_model") if isinstance(getattr(mc, k, None), int))

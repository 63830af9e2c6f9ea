"""Dropout with masks drawn 4 per random word: the same Bernoulli(1 - p) keep mask, ~5x cheaper on CPU.

torch's CPU dropout draws one mt19937 number per element (`bernoulli_`): on minilm-l6 at batch 32 that was 7.7% of
a training step (profiler, 1 thread), more than the attention softmax. Here one `random_()` int64 word (63 random
bits, two mt19937 draws) gives four 15-bit uniforms, so a mask costs a quarter of the draws, and the keep test is a
compare. p is rounded to a multiple of 1/32768 (0.1 -> 0.100006). Same generator (torch's default CPU generator), so
seeding and checkpointed RNG state cover it; the draws differ from torch's, so runs are not bitwise equal to
`nn.Dropout`'s, only equal in distribution (tests/unit/test_fast_dropout.py). CUDA tensors keep torch's kernel.
"""
from __future__ import annotations

import torch

_BITS = 15


class _MaskMul(torch.autograd.Function):
    """x * keep / (1 - p). Saves the bool keep-mask (1 byte an element, not 4: on minilm-l6 at its longest SST-2
    batch that is ~27 MB less at peak) and turns it into a same-dtype factor in both passes: a same-dtype multiply,
    because bool masks in torch.where / masked_fill took 10x longer on this CPU."""

    # The 0/1 product is exact and the scale multiplies as a scalar, rounded once: a bf16 factor tensor would hold
    # 1/(1-p) rounded to bf16 (p=0.1: 1.1094 for 1.1111), a bias on every kept value. fp32: the same bits as before.
    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep.to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep.to(grad.dtype)).mul_(ctx.scale), None, None


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bool keep mask, P(keep) = 1 - p (p rounded to 1/32768)."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    uniform = words.view(torch.int16)[:n].view(shape) & ((1 << _BITS) - 1)
    return uniform >= round(p * (1 << _BITS))


class FastDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        return _MaskMul.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Turns every `nn.Dropout` of `model` into a FastDropout in place (no parameters, state dict unchanged);
    returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Dropout and m.p > 0:
            m.__class__ = FastDropout
            n += 1
    return n

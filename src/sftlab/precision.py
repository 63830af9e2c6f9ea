"""`precision: auto`: bf16 autocast only where this machine computes bf16 matmuls faster than fp32.

Why measure instead of reading CPU flags: the flags do not say it. On a 2-core Xeon with AMX, bf16 matmuls ran ~3x
fp32 (DESIGN.md: 375 vs 120 GFLOP/s); on a 2-core Emerald Rapids VM whose hypervisor hides AMX but shows
`avx512_bf16`, torch 2.13's bf16 matmuls ran at half the fp32 rate (162 vs 316 GFLOP/s at 2 threads, and the same
ratio at minilm-l6's shapes), so bf16 autocast made an SST-2 training step 1.5x *slower* there while adding casts.
A 20-50 ms probe at a transformer's matmul shapes settles it per process; CUDA uses bf16 where the card has it.
Imports nothing from sftlab (serve uses it too).
"""
from __future__ import annotations

import functools
import time

import torch

# minilm-l6's feed-forward shape at batch 32 x ~16 tokens; close enough for any small encoder/decoder's matmuls.
_SHAPE = (512, 384, 1536)
# bf16 must win clearly: a near tie keeps fp32's exact arithmetic and skips autocast's casts.
_MARGIN = 1.15


def resolve(precision: str, device: torch.device | str | None = None) -> bool:
    """True where `precision` (auto | bf16 | fp32) means bf16 autocast on `device`."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bf16_faster(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type)


@functools.lru_cache(maxsize=None)
def bf16_faster(device_type: str) -> bool:
    """Whether bf16 matmuls beat fp32 by `_MARGIN` here (measured once per process and device type)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    ratio = cpu_bf16_speedup()
    return ratio >= _MARGIN


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(reps: int = 5) -> float:
    """fp32 time / bf16 time of one matmul at `_SHAPE` on this CPU with torch's current threads: min over
    interleaved repetitions, so a noisy neighbour slows both sides alike rather than one."""
    m, k, n = _SHAPE
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(reps + 1):  # the first round warms up both kernels
        for a, b in ((a32, b32), (a16, b16)):
            start = time.perf_counter()
            torch.mm(a, b)
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def pad_multiple(setting: int | str, bf16: bool, device: torch.device | str) -> int:
    """`pad_to_multiple_of` resolved: auto is 3 for bf16 autocast on a CPU (oneDNN caches a kernel per matmul
    shape, so fewer distinct widths mean less memory; see config.TrainConfig.pad_to_multiple_of), else 1."""
    if setting != "auto":
        return int(setting)
    return 3 if bf16 and torch.device(device).type == "cpu" else 1


def describe(bf16: bool, precision: str) -> str:
    """One log line saying what `auto` chose and why."""
    chosen = "bf16 autocast" if bf16 else "fp32"
    if precision != "auto":
        return f"precision: {chosen}"
    if torch.cuda.is_available():
        return f"precision auto: {chosen} (CUDA {'with' if bf16 else 'without'} bf16)"
    return (f"precision auto: {chosen} (bf16 matmuls measured {cpu_bf16_speedup():.2f}x fp32 on this CPU; "
            "set train.precision to choose)")


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Stores the frozen `nn.Linear` weights (and frozen biases) of `model` in bf16; returns how many layers.

    Exact under bf16 autocast: autocast casts an fp32 weight to bf16 (round to nearest even) at every F.linear, so
    the matmul sees the same bf16 values either way; what goes is that cast, repeated every micro-batch (and again
    in a checkpointed recompute), the bf16 copy autograd keeps for backward, and half of the fp32 weights' memory
    (smollm2-135m with LoRA: 106M frozen Linear weights, 425 -> 212 MB; issue 22's "bf16 weights" lever, which for
    trained weights would need fp32 master copies and is not done). Only for weights nothing saves (an adapter run
    reloads its base from the source) and nothing reads outside autocast; a weight an Embedding shares (tied output
    layer) is left alone, since the embedding lookup is not an autocast op.
    """
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) or m.weight.requires_grad or id(m.weight) in shared:
            continue
        if m.weight.dtype != torch.float32 or (m.bias is not None and m.bias.requires_grad):
            continue
        m.weight.data = m.weight.data.to(torch.bfloat16)
        if m.bias is not None:
            m.bias.data = m.bias.data.to(torch.bfloat16)
        n += 1
    return n

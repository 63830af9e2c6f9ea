"""train.example_dropout: dropout masks that are a function of (seed, step, example, site), not of a generator's
stream, so an example gets the same masks whatever batch, padded width, micro-batch or process it lands in, and
"P processes == 1 process" holds with dropout too (docs/distributed.md; tests/unit/test_example_dropout.py).

A counter-based generator (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" is the idea; the
mixing function here is splitmix64's finaliser, Steele et al. 2014): each group of 4 neighbours along the last
axis is one 64-bit hash of (row key, site, coordinates), cut into four 15-bit uniforms as fast_dropout cuts a
random word (p is rounded to 1/32768 the same way). Coordinates, not flat offsets: the index of (token t, unit h)
or (head, query, key) does not move when the batch is padded wider. Each nn.Dropout module (attention's included,
which the fused attention core reads) gets a fixed site number, so a recomputation under gradient checkpointing
draws the same mask. Cost: ~10 integer passes per 4 elements, more than fast_dropout's one random word: opt-in.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .fast_dropout import _BITS, _MaskMul, keep_mask

_state = threading.local()
_S = 1 << 14  # coordinate stride: any axis up to 16384 (sequence lengths, hidden sizes, heads)
_GOLDEN, _M1, _M2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64, as int64


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:  # logical shift right of int64 (torch's >> is arithmetic)
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def row_keys(seed: int, step: int, examples: list[int], device) -> torch.Tensor:
    """One int64 key per row: a hash of (seed, step, example index)."""
    x = torch.tensor([[seed, step, e] for e in examples], dtype=torch.int64, device=device)
    return _mix(_mix(_mix(x[:, 0]) ^ x[:, 1]) ^ x[:, 2])


@contextlib.contextmanager
def drawing_for(seed: int, step: int, examples: list[int], device):
    """Masks inside this block are those of these rows (the batch's rows, in order) at this step."""
    _state.keys = row_keys(seed, step, examples, device)
    try:
        yield
    finally:
        _state.keys = None


def example_keep_mask(keys: torch.Tensor, site: int, shape, p: float) -> torch.Tensor:
    """Bool keep mask of `shape` (rows first), P(keep) = 1 - p, from the rows' keys and the site."""
    if keys.shape[0] != shape[0]:
        raise RuntimeError(f"train.example_dropout: {keys.shape[0]} row keys for a batch of {shape[0]} rows")
    rest, last = tuple(shape[1:-1]), shape[-1]
    groups = -(-last // 4)
    index = torch.zeros((), dtype=torch.int64, device=keys.device)
    for n in (*rest, groups):  # ((c0 * S + c1) * S + ...) * S + group, broadcast over the row's axes
        index = (index * _S).unsqueeze(-1) + torch.arange(n, dtype=torch.int64, device=keys.device)
    salt = (site + 1) * 0x94D049BB133111EB % 2**64  # the site's own stream, as a signed int64
    salt -= 2**64 * (salt >= 2**63)
    words = _mix((keys.view(-1, *[1] * (len(rest) + 1)) ^ salt) + index * _GOLDEN)
    uniform = words.unsqueeze(-1).view(torch.int16).flatten(-2)[..., :last] & ((1 << _BITS) - 1)
    return uniform >= round(p * (1 << _BITS))


def draw(shape, p: float, device, site: int | None) -> torch.Tensor:
    """The keep mask a dropout site uses: per example inside drawing_for, else fast_dropout's."""
    keys = getattr(_state, "keys", None)
    if keys is None or site is None:
        return keep_mask(shape, p, device)
    return example_keep_mask(keys, site, shape, p)


class ExampleDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or getattr(_state, "keys", None) is None:
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        return _MaskMul.apply(x, draw(x.shape, self.p, x.device, self.site), 1.0 / (1.0 - self.p))


def use_example_dropout(model: torch.nn.Module) -> int:
    """Every dropout module of `model` (p > 0) draws per example, with a fixed site number; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.__class__ = ExampleDropout
            m.site = n
            n += 1
    return n

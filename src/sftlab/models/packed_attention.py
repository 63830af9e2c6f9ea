"""Attention for packed decoder rows, one example at a time: the work of the examples, not of the whole pack.

A packed row holds several examples, with position ids restarting at 0 for each (data/lm.py). transformers turns
that into a block-diagonal causal mask and hands it to sdpa, which then computes every query against every key of the
row (L^2, three quarters of it masked away when four ~128-token chats share a 512-token pack) and, because a mask is
given, repeats the grouped key/value heads (SmolLM2: 3 -> 9) before its kernel. Here each example's slice of the row
runs through sdpa with `is_causal=True` and grouped heads (`enable_gqa`), no mask: the same attention (each query sees
its own example's keys up to itself), per example. On smollm2-135m, LoRA, 2 x 512 packed tokens (2-core CPU, bf16),
attention was ~21% of a step through the masked kernel (issue 22; the figures are in docs/performance.md).

Registered as transformers attention implementation "sftlab_packed" with sdpa's mask function, so everything else
(unpacked batches with padding, eval, generation with a cache) takes transformers' sdpa path unchanged. The per-example
path runs only where it is exact by construction: training mode, queries and keys of the same length (no cache),
and position ids that restart inside a row; the segments come from those position ids (the same rule as
transformers' `find_packed_sequence_indices`: a new example wherever a position is not the previous one plus 1).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "sftlab_packed"
_last: list = [None, None]  # (position_ids tensor, its segments): every layer of one forward gets the same tensor


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each example; None when no row restarts its positions (nothing packed)."""
    if _last[0] is position_ids:
        return _last[1]
    pos = position_ids.detach().cpu()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    found = None
    if bool(starts[:, 1:].any()):
        length = pos.shape[1]
        found = []
        for row in starts.tolist():
            cuts = [i for i, s in enumerate(row) if s] + [length]
            found.append(list(zip(cuts[:-1], cuts[1:])))
    _last[:] = [position_ids, found]
    return found


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention interface: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    spans = None
    # Anything beyond plain causal attention (a sliding window, soft-capping, sinks, a position bias) keeps the
    # masked kernel, which transformers builds for it.
    plain = not (getattr(module, "sliding_window", None) or kwargs.get("sliding_window") or kwargs.get("softcap")
                 or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None
                 or kwargs.get("position_bias") is not None)
    if (module.training and plain and pos is not None and query.shape[2] == key.shape[2] == pos.shape[-1]
            and getattr(module, "is_causal", True)):
        spans = segments(pos if pos.dim() == 2 else pos.view(-1, pos.shape[-1]))
    if spans is None or len(spans) != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa, cpu = query.shape[1] != key.shape[1], query.device.type == "cpu"
    rows = []
    for r, row_spans in enumerate(spans):
        pieces = []
        for s, e in row_spans:
            # Below 256 tokens torch's math kernel ran fwd + bwd ~25% faster than its CPU flash kernel (bf16, 9/3
            # heads of 64: 2.6 vs 3.6 ms at 128 tokens); from 256 on flash wins and saves no L^2 probabilities.
            with sdpa_kernel(SDPBackend.MATH) if cpu and e - s < 256 else contextlib.nullcontext():
                pieces.append(F.scaled_dot_product_attention(
                    query[r:r + 1, :, s:e], key[r:r + 1, :, s:e], value[r:r + 1, :, s:e], dropout_p=dropout,
                    scale=scaling, is_causal=True, enable_gqa=gqa))
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Makes "sftlab_packed" a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_packed_attention(model) -> bool:
    """Switches a decoder on transformers' sdpa to the per-example path; False (unchanged) for any other kernel."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        return False
    model.set_attn_implementation(register())
    return True

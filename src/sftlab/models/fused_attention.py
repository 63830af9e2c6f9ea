"""Encoder self-attention for training: one QKV matmul and an attention core that keeps one copy of the probabilities.

What transformers' BERT self-attention does per block, and what it costs on a CPU (profiled on minilm-l6, SST-2,
batch 32, fp32, 2 threads): three [N, H] x [H, H] projections of the same input, then sdpa, which on CPU with
dropout takes the math path: softmax, `bernoulli_` per probability (one mt19937 draw each: 3.5% of a step), and
autograd keeps the softmax output, the dropout mask and the dropped-out probabilities (three [B, heads, L, L]
tensors per block) for backward.

Here: the three projections run as one [N, H] x [H, 3H] matmul (weights concatenated per call: a 3H x H copy);
the core is one autograd Function that saves q, k, v, the softmax output and a bool keep-mask drawn four per random
word (models/fast_dropout.py), and writes its own backward (softmax backward via torch's kernel). Same math as the
eager/sdpa path, so outputs and gradients agree to float rounding (tests/unit/test_fused_attention.py); dropout
draws differ from torch's, as with fast dropout.

Applied per model at load where the module has BERT's self-attention layout (query/key/value Linears, heads of
`attention_head_size`, `scaling`) and a padded probe gives the unpatched outputs; caches (decoders), attention
outputs and cross-attention take the class's own forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .example_dropout import draw
from .probe import patched_equals_unpatched


class _AttentionCore(torch.autograd.Function):
    """softmax(q k^T * scale + mask) -> dropout(p) -> @ v.  q: [B, h, Lq, d], k/v: [B, h, Lk, d];
    mask: None, bool [B, 1|h, Lq|1, Lk] (True = attend) or additive float of that shape. Returns [B, h, Lq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float, site: int | None = None):
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores.add_(mask)
        # Softmax in fp32 for low-precision inputs, as autocast and sdpa do, then back to the matmul dtype.
        low = q.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None).to(q.dtype)
        keep = None
        if p > 0:
            keep = draw(probs.shape, p, probs.device, site)  # fast_dropout's, or per example (example_dropout)
            dropped = probs * keep.to(probs.dtype).mul_(1.0 / (1.0 - p))
        else:
            dropped = probs
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.p, ctx.scale = p, scale
        return torch.matmul(dropped, v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs, keep = ctx.saved_tensors
        grad = grad.to(v.dtype).contiguous()  # one copy here, not one inside each matmul below
        if keep is not None:
            factor = keep.to(probs.dtype).mul_(1.0 / (1.0 - ctx.p))
            grad_v = torch.matmul((probs * factor).transpose(-1, -2), grad)
            grad_probs = torch.matmul(grad, v.transpose(-1, -2)).mul_(factor)
        else:
            grad_v = torch.matmul(probs.transpose(-1, -2), grad)
            grad_probs = torch.matmul(grad, v.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None, None


def attention(q, k, v, mask, p: float, scale: float, site: int | None = None) -> torch.Tensor:
    """The attention core (see _AttentionCore); [B, h, Lq, d]. `site`: the example_dropout site of its dropout."""
    return _AttentionCore.apply(q, k, v, mask, p, scale, site)


def _fused_forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
    # Checked per call: a strategy applied after the patch may wrap the projections (peft LoRA/DoRA layers add
    # their own path to the output, which the concatenated base weights would skip).
    plain = all(type(getattr(self, n)) is torch.nn.Linear for n in ("query", "key", "value"))
    if not plain or past_key_values is not None or kwargs.get("output_attentions") or \
            kwargs.get("encoder_hidden_states") is not None:
        return type(self).forward(self, hidden_states, attention_mask, past_key_values=past_key_values, **kwargs)
    batch, length, _ = hidden_states.shape
    weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
    bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
    qkv = F.linear(hidden_states, weight, bias).view(batch, length, 3, -1, self.attention_head_size)
    # One copy into [3, B, heads, L, d]: every matmul of the core then reads contiguous operands (or a transposed
    # view, which BLAS takes as is) instead of copying its strided inputs itself, forward and backward.
    q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    out = attention(q, k, v, attention_mask, self.dropout.p if self.training else 0.0, self.scaling,
                    getattr(self.dropout, "site", None))
    return out.transpose(1, 2).reshape(batch, length, -1), None


def _fits(module: torch.nn.Module) -> bool:
    names = ("query", "key", "value")
    return all(isinstance(getattr(module, n, None), torch.nn.Linear) and getattr(module, n).bias is not None
               for n in names) and hasattr(module, "attention_head_size") and hasattr(module, "scaling") and \
        isinstance(getattr(module, "dropout", None), torch.nn.Dropout) and \
        not getattr(module, "is_decoder", False) and not getattr(module, "is_causal", False)


def enable_fused_attention(model: torch.nn.Module, vocab_size: int | None = None) -> int:
    """Patch every BERT-layout self-attention of `model` in place, keep the patch only if a padded probe gives the
    unpatched logits (fp32, eval mode); returns how many modules are patched."""
    if getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False):
        return 0
    targets = [m for m in model.modules() if _fits(m) and "forward" not in vars(m)]
    if not targets:
        return 0
    for m in targets:
        m.forward = types.MethodType(_fused_forward, m)
    if patched_equals_unpatched(model, targets, vocab_size or model.config.vocab_size):
        return len(targets)
    for m in targets:
        del m.forward
    return 0

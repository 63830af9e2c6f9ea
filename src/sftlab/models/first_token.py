"""The last encoder block computed for the first token only, when the head reads nothing else.

A sequence classifier on BERT/RoBERTa/ELECTRA reads the last block's output at position 0 ([CLS]: BERT's pooler,
RoBERTa's and ELECTRA's classification heads) and discards the rest. The last block's queries, attention output,
attention projection and feed-forward for the other positions are wasted work; only its keys and values need
every position. Skipping them is exact (same logits, same gradients, tests/unit/test_first_token.py) and removes
(12 - 2) / 12 of a block's matmul FLOPs: 14% of minilm-l6's six blocks, and the activations they would save.

Decided per model at load, by evidence rather than class-name tables: the block must have BERT's layout
(`attention.self.{query,key,value}`, `attention.output`, `feed_forward_chunk`) and the patched model must give
the unpatched logits on a padded probe batch; otherwise the model is left as it was. Prefix tuning (a KV cache)
and callers asking for hidden states or attentions take the full block.
"""
from __future__ import annotations

import types

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from ..strategies.anatomy import find_stack
from .probe import patched_equals_unpatched


def enable_first_token_last_layer(model: torch.nn.Module, vocab_size: int | None = None) -> bool:
    """Patch the last block of `model` (an HF sequence classifier) in place; True if patched and verified."""
    try:
        _, stack = find_stack(model)
    except Exception:  # noqa: BLE001  (no block stack: nothing to patch)
        return False
    block = stack[-1]
    attn = getattr(block, "attention", None)
    sa = getattr(attn, "self", None)
    if not all(hasattr(sa, n) for n in ("query", "key", "value", "attention_head_size", "scaling")) or \
            not hasattr(attn, "output") or not hasattr(block, "feed_forward_chunk") or \
            getattr(block, "add_cross_attention", False) or getattr(model.config, "is_decoder", False):
        return False
    block.forward = types.MethodType(_first_token_forward, block)
    if patched_equals_unpatched(model, [block], vocab_size or model.config.vocab_size):
        return True
    del block.forward  # back to the class's forward
    return False


def _first_token_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, past_key_values=None, **kwargs):
    if past_key_values is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                                  **kwargs)
    sa = self.attention.self
    batch, length, _ = hidden_states.shape
    first = hidden_states[:, :1]
    q = sa.query(first).view(batch, 1, -1, sa.attention_head_size).transpose(1, 2)
    k = sa.key(hidden_states).view(batch, length, -1, sa.attention_head_size).transpose(1, 2)
    v = sa.value(hidden_states).view(batch, length, -1, sa.attention_head_size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1, :]  # the first query's row of a [B, 1, L, L] mask
    site = getattr(sa.dropout, "site", None)
    if site is not None:  # train.example_dropout: the attention core that draws its mask per example
        from .fused_attention import attention

        out = attention(q, k, v, attention_mask, sa.dropout.p if sa.training else 0.0, sa.scaling,
                        site).transpose(1, 2)
    else:
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
        out, _ = attend(sa, q, k, v, attention_mask, dropout=sa.dropout.p if sa.training else 0.0,
                        scaling=sa.scaling, is_causal=False)
    attention_output = self.attention.output(out.reshape(batch, 1, -1).contiguous(), first)
    return self.feed_forward_chunk(attention_output)

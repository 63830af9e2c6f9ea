"""Causal-LM invariants on a tiny Llama: packing changes nothing but speed; targets never cross examples."""
from __future__ import annotations

import random

import pytest
import torch

from sftlab.data.lm import IGNORE, build, collate_lm, pack
from sftlab.tasks.causal_lm import causal_lm_loss


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def toy_examples(n=12, seed=0):
    rng = random.Random(seed)
    ids, masks = [], []
    for _ in range(n):
        length = rng.randint(4, 40)
        ids.append([rng.randrange(1, 97) for _ in range(length)])
        prompt = rng.randint(1, length - 2)
        masks.append([0] * prompt + [1] * (length - prompt))  # loss on the "assistant" tail only
    return build(ids, masks, {})


def test_targets_are_shifted_and_masked():
    data = build([[5, 6, 7, 8]], [[0, 0, 1, 1]], {})
    assert data.labels == [[IGNORE, 7, 8, IGNORE]] and data.weights == [2]


def test_packing_keeps_every_token_once_within_budget():
    data = toy_examples(50)
    packed = pack(data, 64)
    assert sorted(t for row in packed.input_ids for t in row) == sorted(t for row in data.input_ids for t in row)
    assert max(packed.lengths) <= 64 and sum(packed.weights) == sum(data.weights)
    assert len(packed) < len(data)
    for pos in packed.position_ids:  # positions restart at 0 at each example
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0 and all(pos[i] == pos[i - 1] + 1 for i in range(1, len(pos)) if i not in starts)


def test_packed_loss_equals_unpacked_loss(tiny_llama):
    data = toy_examples(12)
    packed = pack(data, 96)
    assert len(packed) < len(data)
    with torch.no_grad():
        ref, _ = causal_lm_loss(tiny_llama, collate_lm(data, list(range(len(data))), pad_id=0))
        got, _ = causal_lm_loss(tiny_llama, collate_lm(packed, list(range(len(packed))), pad_id=0))
        one_by_one = sum(causal_lm_loss(tiny_llama, collate_lm(data, [i], pad_id=0))[0] for i in range(len(data)))
    assert abs(ref.item() - one_by_one.item()) < 1e-4 * max(1.0, abs(ref.item()))
    assert abs(got.item() - ref.item()) / sum(data.weights) < 1e-5  # mean per-token loss within 1e-5


def test_packed_gradients_equal_unpacked(tiny_llama):
    data = toy_examples(8, seed=3)
    packed = pack(data, 128)
    grads = []
    for d in (data, packed):
        tiny_llama.zero_grad()
        loss, _ = causal_lm_loss(tiny_llama, collate_lm(d, list(range(len(d))), pad_id=0))
        (loss / sum(d.weights)).backward()
        grads.append({n: p.grad.clone() for n, p in tiny_llama.named_parameters()})
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert worst < 1e-5, worst

"""Distillation loss terms as equations (issue 16): references, limits and zeros, on random tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftlab.objectives.kd_losses import (attention_mse, hidden_mse, mix, soft_kl, topk_kl,
                                         uniform_layer_map)


def logits(rows=5, classes=4, seed=0, scale=3.0):
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
def test_soft_kl_is_t_squared_times_torch_kl_div(temperature):
    s, t = logits(seed=1), logits(seed=2)
    ref = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                   reduction="sum") * temperature ** 2
    assert soft_kl(s, t, temperature).item() == pytest.approx(ref.item(), rel=1e-5)


def test_a_teacher_equal_to_the_student_gives_zero_loss_and_gradient():
    s = logits(seed=3).float().requires_grad_()
    loss = soft_kl(s, s.detach().clone(), 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and s.grad.abs().max().item() < 1e-6


def test_high_temperature_gradient_is_logit_matching():
    """Hinton et al. 2015, eq. 3: with T^2, at large T d/dz_i -> ((z_i - mean z) - (v_i - mean v)) / C per row."""
    s = logits(seed=4, scale=1.0).float().requires_grad_()
    t = logits(seed=5, scale=1.0).float()
    soft_kl(s, t, 100.0).backward()
    c = s.shape[1]
    expect = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).detach() / c
    assert torch.allclose(s.grad, expect, atol=5e-3)  # first order in 1/T: ~2e-3 off at T = 100


def test_alpha_zero_is_the_hard_loss_itself_and_alpha_mixes():
    hard, soft = torch.tensor(2.5), torch.tensor(7.0)
    assert mix(hard, soft, 0.0) is hard
    assert mix(hard, soft, 0.25).item() == pytest.approx(0.75 * 2.5 + 0.25 * 7.0)
    assert mix(hard, soft, 1.0).item() == pytest.approx(7.0)


def test_topk_over_the_whole_vocabulary_equals_soft_kl():
    s, t = logits(rows=6, classes=11, seed=6), logits(rows=6, classes=11, seed=7)
    values, ids = t.topk(11, dim=-1)
    assert topk_kl(s, values, ids, 2.0).item() == pytest.approx(soft_kl(s, t, 2.0).item(), rel=1e-5)
    v3, i3 = t.topk(3, dim=-1)  # a k-wide cache: zero when the student agrees on those k tokens' ratios
    assert topk_kl(t, v3, i3, 1.0).item() > -1e-9


def test_identical_attention_and_hidden_states_give_zero_and_map_is_uniform():
    g = torch.Generator().manual_seed(0)
    attn = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1) for _ in range(4)]
    hidden = [torch.randn(2, 5, 8, generator=g) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ident = [0, 1, 2, 3]
    assert attention_mse(attn, attn, ident, mask).item() == 0.0
    assert hidden_mse(hidden, hidden, ident, mask).item() == 0.0
    proj = torch.nn.Linear(8, 8, bias=False)
    torch.nn.init.eye_(proj.weight)
    assert hidden_mse(hidden, hidden, ident, mask, proj).item() == pytest.approx(0.0, abs=1e-10)
    # padding never counts: change a padded position and nothing moves
    other = [h.clone() for h in hidden]
    other[2][1, 4] += 100.0
    assert hidden_mse(other, hidden, ident, mask).item() == 0.0
    assert uniform_layer_map(3, 6) == [1, 3, 5] and uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(3, 12) == [3, 7, 11]


def test_shape_mismatch_names_the_layers():
    a = [torch.zeros(1, 2, 3, 3)]
    b = [torch.zeros(1, 4, 3, 3)]
    with pytest.raises(ValueError, match="same heads and tokenizer"):
        attention_mse(a, b, [0], torch.ones(1, 3))
    with pytest.raises(ValueError, match="layer_map"):
        uniform_layer_map(4, 2)


def test_topk_with_the_rest_bucket_is_zero_for_an_equal_student_and_soft_kl_at_full_k():
    s = logits(rows=6, classes=50, seed=8).float()
    for temperature in (1.0, 2.0):
        v, i = s.topk(5, dim=-1)
        lse = (s / temperature).logsumexp(-1)
        x = s.clone().requires_grad_()
        loss = topk_kl(x, v, i, temperature, lse)
        loss.backward()
        assert abs(loss.item()) < 1e-5 and x.grad.abs().max().item() < 1e-5
        t = logits(rows=6, classes=50, seed=9).float()
        vt, it = t.topk(50, dim=-1)
        full = topk_kl(s, vt, it, temperature, (t / temperature).logsumexp(-1))
        assert full.item() == pytest.approx(soft_kl(s, t, temperature).item(), rel=1e-4)
        v5, i5 = t.topk(5, dim=-1)  # the partition loses detail: never more than the full KL
        assert 0 <= topk_kl(s, v5, i5, temperature, (t / temperature).logsumexp(-1)).item() <= full.item() + 1e-5

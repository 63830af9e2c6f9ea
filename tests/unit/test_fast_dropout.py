"""FastDropout: nn.Dropout's distribution (keep rate, scale, gradient), seeded by torch's generator, off in eval."""
from __future__ import annotations

import pytest
import torch

from sftlab.models.fast_dropout import FastDropout, use_fast_dropout


def _fast(p):
    m = torch.nn.Dropout(p)
    m.__class__ = FastDropout
    return m


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rate_scale_and_gradient(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(400, 1001, dtype=dtype, requires_grad=True)  # odd size: the last random word is partly used
    y = _fast(p)(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 4e-3  # ~400k Bernoulli draws: sd < 1e-3
    assert torch.allclose(y[kept].float(), torch.tensor(1 / (1 - p)), rtol=1e-2)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept].float(), torch.tensor(1 / (1 - p)), rtol=1e-2)


def test_masks_are_independent_of_position_and_between_calls():
    torch.manual_seed(0)
    a, b = (_fast(0.5)(torch.ones(200, 1000)) != 0 for _ in range(2))
    assert abs((a == b).float().mean().item() - 0.5) < 5e-3  # independent calls agree half the time
    # each of the four 15-bit lanes of a random word keeps at the same rate
    lanes = (a.reshape(-1)[: 200 * 1000 // 4 * 4].reshape(-1, 4)).float().mean(0)
    assert torch.all((lanes - 0.5).abs() < 0.01)


def test_seeded_like_torch_and_off_in_eval():
    m = _fast(0.3)
    torch.manual_seed(7)
    a = m(torch.ones(50, 50))
    torch.manual_seed(7)
    assert torch.equal(a, m(torch.ones(50, 50)))
    m.eval()
    x = torch.randn(10, 10)
    assert torch.equal(m(x), x)


def test_use_fast_dropout_swaps_modules_without_touching_the_state_dict(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2,
                                                               hidden_dropout_prob=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = use_fast_dropout(model)
    assert n > 0 and sum(isinstance(m, FastDropout) for m in model.modules()) == n
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_masks_are_unbiased():
    """The 1/(1-p) scale multiplies as a scalar, rounded once with the value: no bf16-rounded factor (p=0.1: 1.1094
    for 1.1111, a -0.16% bias on every kept value) - here 10 standard errors."""
    from sftlab.models.fast_dropout import FastDropout

    torch.manual_seed(0)
    x = torch.rand(4_000_000).add_(1).bfloat16()
    out = FastDropout(0.1).train()(x)
    rel = out.double().mean() / x.double().mean() - 1
    assert abs(rel) < 5e-4, rel

"""Fused QKV + attention core == transformers' self-attention: logits, gradients, dropout, and where it stays off."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_same_logits_and_grads, best_weights_per_setting, model_pair, padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(tiny_model_dir, attention="sdpa"):
    return model_pair(tiny_model_dir, attention=attention)


_batch = padded_batch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("first_token", [False, True])
def test_patched_logits_and_gradients_equal_unpatched(tiny_model_dir, attention, first_token):
    from sftlab.models.first_token import enable_first_token_last_layer
    from sftlab.models.fused_attention import enable_fused_attention

    ref, fused = _pair(tiny_model_dir, attention)
    assert enable_fused_attention(fused) == 2  # both blocks
    if first_token:
        assert enable_first_token_last_layer(fused)
    assert_same_logits_and_grads(ref, fused)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_core_gradients_equal_autograd_reference_with_dropout(monkeypatch, mask_kind):
    """float64 gradcheck of the hand-written backward, with a fixed dropout mask shared by the reference."""
    import sftlab.models.fused_attention as fa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.rand(2, 3, 5, 5, generator=g) > 0.3
    monkeypatch.setattr(fa, "draw", lambda shape, p, device, site: keep)
    pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    pad[1, :, :, 3:] = False
    mask = {"none": None, "bool": pad,
            "additive": torch.zeros(2, 1, 1, 5, dtype=torch.float64).masked_fill(~pad, -1e9)}[mask_kind]
    p, scale = 0.3, 0.5

    def reference(q, k, v):
        s = q @ k.transpose(-1, -2) * scale
        if mask is not None:
            s = s.masked_fill(~pad, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
        return (torch.softmax(s, -1) * keep / (1 - p)) @ v

    torch.testing.assert_close(fa.attention(q, k, v, mask, p, scale), reference(q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: fa.attention(q, k, v, mask, p, scale), (q, k, v))
    out_grad = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(fa.attention(q, k, v, mask, p, scale), (q, k, v), out_grad)
    theirs = torch.autograd.grad(reference(q, k, v), (q, k, v), out_grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_attention_dropout_keeps_the_expected_fraction():
    from sftlab.models.fused_attention import attention

    torch.manual_seed(0)
    q = k = torch.zeros(4, 4, 64, 8)  # uniform attention: every probability 1/64
    v = torch.ones(4, 4, 64, 8)
    out = attention(q, k, v, None, 0.25, 1.0)  # mean over kept probabilities x 1/(1-p): expectation 1
    assert abs(out.mean().item() - 1.0) < 0.02
    assert out.std().item() > 0.01  # masks differ per row


def test_lora_wrapped_projections_take_the_class_forward(tiny_model_dir):
    """peft wraps query/value after the patch: the fused path would drop the LoRA delta, so it must step aside."""
    from peft import LoraConfig, get_peft_model

    from sftlab.models.fused_attention import enable_fused_attention

    ref, fused = _pair(tiny_model_dir)
    assert enable_fused_attention(fused)
    cfg = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    torch.manual_seed(3)
    ref = get_peft_model(ref, LoraConfig(**cfg))
    torch.manual_seed(3)
    fused = get_peft_model(fused, LoraConfig(**cfg))
    ids, mask = _batch()
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits)


def test_probe_failure_leaves_the_model_unpatched(tiny_model_dir, monkeypatch):
    import sftlab.models.fused_attention as fa

    _, model = _pair(tiny_model_dir)
    monkeypatch.setattr(fa, "patched_equals_unpatched", lambda *a: False)
    assert fa.enable_fused_attention(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())


def test_training_with_and_without_it_ends_at_the_same_weights(tiny_overrides, tmp_path):
    # sftlab.train twice in one process: the second call reaches the package, which must be callable too.
    a, b = best_weights_per_setting(tiny_overrides, tmp_path, "train.fused_attention", ["true", "false"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)

"""The last block computed for the first token only == the full block: logits, gradients, and whole runs."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_same_logits_and_grads, model_pair


_pair = model_pair


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_patched_logits_and_gradients_equal_full_block(tiny_model_dir, attention, task):
    from sftlab.models.first_token import enable_first_token_last_layer

    full, fast = _pair(tiny_model_dir, task, attention)
    assert enable_first_token_last_layer(fast)
    assert_same_logits_and_grads(full, fast)


def test_models_the_probe_rejects_stay_unpatched(tiny_model_dir, monkeypatch):
    """A head that reads more than the first token (here: mean of the last hidden states) fails the probe."""
    import sftlab.models.first_token as ft

    _, model = _pair(tiny_model_dir)
    real_forward = type(model).forward

    def mean_pooling_head(self, input_ids=None, attention_mask=None, **kw):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return type("O", (), {"logits": self.classifier(out.last_hidden_state.mean(1))})()

    monkeypatch.setattr(type(model), "forward", mean_pooling_head)
    assert not ft.enable_first_token_last_layer(model)
    assert "forward" not in vars(model.bert.encoder.layer[-1])  # the class's own forward again
    monkeypatch.setattr(type(model), "forward", real_forward)


def test_training_with_and_without_it_ends_at_the_same_weights(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    import sftlab.train.loop as loop
    from sftlab.config import load_config

    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + ["train.epochs=1"]
    runs = [loop.train(load_config(None, over + [f"train.first_token_last_layer={on}",
                                                  f"output_dir={tmp_path / str(on)}"])) for on in (True, False)]
    a, b = (load_file(str(d / "best" / "model.safetensors")) for d in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)

"""`model.attention`: eager and sdpa kernels train the same model (auto picks eager for short CPU encoders)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from sftlab.config import load_config
from sftlab.models.load import attention_for
from sftlab.train.loop import train


def test_auto_resolution():
    assert attention_for("auto", "classification", 128) is None  # transformers' default
    assert attention_for("eager", "causal_lm", 64) == "eager"
    assert attention_for("sdpa", "classification", 64) == "sdpa"


def test_eager_and_sdpa_train_the_same_weights(tiny_overrides, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith("output_dir=")] + ["train.epochs=1"]
    runs = {a: train(load_config(None, base + [f"model.attention={a}", f"output_dir={tmp_path / a}"]))
            for a in ("eager", "sdpa")}
    w = {a: load_file(str(d / "best" / "model.safetensors")) for a, d in runs.items()}
    for k in w["eager"]:
        torch.testing.assert_close(w["eager"][k], w["sdpa"][k], rtol=1e-5, atol=1e-6)

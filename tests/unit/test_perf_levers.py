"""precision auto, token-budget micro-batches and untouched optimizer zeros: what they decide and that runs agree."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tests.conftest import best_weights_per_setting

pytestmark = pytest.mark.usefixtures("single_thread")


def test_precision_resolves_explicit_choices_and_auto_follows_the_measurement(monkeypatch):
    import sftlab.precision as precision

    assert precision.resolve("bf16", "cpu") is True and precision.resolve("fp32", "cpu") is False
    for speedup, expected in ((0.5, False), (1.05, False), (3.0, True)):
        precision.bf16_faster.cache_clear()
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda s=speedup: s)
        assert precision.resolve("auto", "cpu") is expected
        assert ("bf16 autocast" in precision.describe(expected, "auto")) is expected
    precision.bf16_faster.cache_clear()
    monkeypatch.undo()
    assert precision.cpu_bf16_speedup() > 0  # the real probe runs and gives a ratio


def test_config_default_precision_is_auto_and_bad_values_name_the_choices():
    import sftlab
    from sftlab.errors import ConfigError

    assert sftlab.load_config(None, ["model.name=x", "data.train=t.jsonl"]).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        sftlab.load_config(None, ["model.name=x", "data.train=t.jsonl", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        sftlab.load_config(None, ["model.name=x", "data.train=t.jsonl", "train.micro_batch_tokens=0"])


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_cuts_partition_the_micro_batch_within_budget(seed):
    from sftlab.data.batches import micro_batches

    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(40)]
    step = rng.sample(range(40), 32)
    world, accum, budget = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([30, 100, 400])
    for rank in range(world):
        plain = micro_batches(step, lengths, world, rank, accum)
        cut = micro_batches(step, lengths, world, rank, accum, budget)
        assert [i for m in cut for i in m] == [i for m in plain for i in m]  # same rows, same order
        for m in cut:
            assert len(m) == 1 or len(m) * max(lengths[i] for i in m) <= budget


def test_token_budget_run_equals_uncut_run(tiny_overrides, tmp_path):
    """Cutting micro-batches by tokens changes only how the step's sums are computed: same weights."""
    a, b = best_weights_per_setting(tiny_overrides, tmp_path, "train.micro_batch_tokens", ["null", "24"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    summary = json.loads((tmp_path / "24" / "summary.json").read_text())
    assert summary["micro_batch_tokens"] == 24 and summary["precision"] == "fp32"


def test_lazy_moments_start_as_untouched_zero_pages():
    import numpy as np

    from sftlab.train.optim import _untouched_zeros

    p = torch.nn.Parameter(torch.randn(3000, 384))
    z = _untouched_zeros(p)
    assert z.shape == p.shape and z.dtype == p.dtype and not z.any()
    z[5] = 1.0  # an ordinary writable tensor
    assert z.sum().item() == 384
    assert isinstance(z.numpy(), np.ndarray)

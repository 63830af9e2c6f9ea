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
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        sftlab.load_config(None, ["model.name=x", "data.train=t.jsonl", "train.pad_to_multiple_of=0"])


def test_pad_multiple_auto_is_3_only_for_bf16_on_cpu():
    from sftlab.precision import pad_multiple

    assert pad_multiple("auto", True, "cpu") == 3
    assert pad_multiple("auto", False, "cpu") == 1 and pad_multiple("auto", True, "cuda") == 1
    assert pad_multiple(8, False, "cpu") == 8


@pytest.mark.parametrize("seed", range(10))
def test_eval_batches_cover_every_row_once_within_the_token_budget(seed):
    from sftlab.data.batches import eval_batches

    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 90))]
    for size, budget in ((16, None), (128, 200), (8, 50)):
        batches = eval_batches(lengths, size, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= size and (len(b) == 1 or not budget or len(b) * max(lengths[i] for i in b) <= budget)


def test_padding_to_a_multiple_and_token_capped_eval_give_the_same_logits(tiny_model_dir):
    """Extra padding is masked and batching is per row: predictions equal (fp32)."""
    from sftlab.data.batches import Encoded, collate
    from sftlab.eval.infer import predict_logits
    from sftlab.models import load_model

    rng = random.Random(0)
    ids = [[101] + [rng.randint(1000, 1100) for _ in range(rng.randint(1, 20))] + [102] for _ in range(23)]
    data = Encoded(ids, None, [rng.randint(0, 1) for _ in ids], 0)
    assert collate(data, [0, 1, 2], 0, False, 8)["input_ids"].shape[1] % 8 == 0
    model = load_model(str(tiny_model_dir), "classification", ["0", "1"], seed=0)
    cpu = torch.device("cpu")
    plain, loss = predict_logits(model, data, "classification", batch_size=64, pad_id=0, device=cpu, bf16=False)
    padded, loss2 = predict_logits(model, data, "classification", batch_size=64, pad_id=0, device=cpu, bf16=False,
                                   max_tokens=40, pad_multiple=8)
    torch.testing.assert_close(torch.from_numpy(padded), torch.from_numpy(plain), rtol=1e-4, atol=1e-5)
    assert loss2 == pytest.approx(loss, rel=1e-4)


def test_streamed_optimizer_file_reads_back_with_safetensors():
    import tempfile

    from safetensors.torch import load_file

    from sftlab.train.checkpoint import save_tensors

    tensors = {"0.exp_avg": torch.randn(30, 7), "0.step": torch.tensor(3.0), "1.m": torch.randn(4, 5).t(),
               "2.b": torch.randn(6).bfloat16(), "3.i": torch.arange(5), "4.e": torch.zeros(0, 3)}
    with tempfile.TemporaryDirectory() as d:
        save_tensors(tensors, f"{d}/o.safetensors")
        back = load_file(f"{d}/o.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


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
        start = 0
        for chunk in plain:  # each chunk is cut into the fewest equal pieces within the budget (+ < one row)
            pieces = []
            while sum(map(len, pieces)) < len(chunk):
                pieces.append(cut[start + len(pieces)])
            start += len(pieces)
            width = max(lengths[i] for i in chunk)
            size = -(-len(chunk) // -(-len(chunk) * width // budget))
            assert [len(m) for m in pieces[:-1]] == [size] * (len(pieces) - 1) and len(pieces[-1]) <= size
            assert all((len(m) - 1) * max(lengths[i] for i in m) < budget for m in pieces)


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

"""train.example_dropout: masks are a function of (seed, step, example, site). Equations: an example's mask is the
same at any row position and padded width; the keep rate is 1 - p; a tiny BERT *with dropout* trains the same
weights on 2 processes x batch 4 as on 1 x batch 8 (which plain dropout cannot give: each process draws its own)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import _tiny_bert
from tests.unit.test_ddp import LAUNCHERS, free_port
from tests.unit.test_multinode import common_of, run_ok, weights, worst


def test_a_mask_depends_on_the_example_not_the_batch():
    from sftlab.models.example_dropout import example_keep_mask, row_keys

    a = example_keep_mask(row_keys(0, 3, [5, 9], "cpu"), 2, (2, 10, 8), 0.1)
    b = example_keep_mask(row_keys(0, 3, [9], "cpu"), 2, (1, 14, 8), 0.1)  # another row position, wider
    assert torch.equal(a[1], b[0][:10])
    c = example_keep_mask(row_keys(0, 3, [9], "cpu"), 2, (1, 2, 7, 9), 0.1)  # attention: [heads, Lq, Lk]
    d = example_keep_mask(row_keys(0, 3, [4, 9], "cpu"), 2, (2, 2, 5, 6), 0.1)
    assert torch.equal(c[0][:, :5, :6], d[1])
    others = [example_keep_mask(row_keys(*k, [9], "cpu"), s, (1, 10, 8), 0.1) for *k, s in
              ((1, 3, 2), (0, 4, 2), (0, 3, 3))]  # another seed, step or site: another mask
    assert all(not torch.equal(o[0], a[1]) for o in others)
    big = example_keep_mask(row_keys(0, 1, list(range(64)), "cpu"), 0, (64, 100, 50), 0.1)
    assert abs(big.float().mean().item() - 0.9) < 0.003


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), 32, seed=0, dropout=0.1)


def test_two_processes_equal_one_with_dropout(tiny_overrides, dropout_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = [o for o in common_of(tiny_overrides) if not o.startswith("model.name")] + [
        f"model.name={dropout_model_dir}", "train.example_dropout=true"]
    two, one, plain = tmp_path / "two", tmp_path / "one", tmp_path / "plain"
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.batch_size=4", f"output_dir={two}"],
           env)
    run_ok(["-m", "sftlab", "train", "-", *common, "train.batch_size=8", f"output_dir={one}"], env)
    assert worst(weights(two), weights(one)) <= 1e-5
    common = [o for o in common if o != "train.example_dropout=true"]
    run_ok(["-m", "sftlab", "train", "-", *common, "train.batch_size=8", f"output_dir={plain}"], env)
    assert worst(weights(plain), weights(one)) > 1e-3  # the model does drop out (masks differ from the stream's)


def test_refused_where_masks_cannot_follow_the_examples(tiny_overrides, dropout_model_dir, capsys):
    from sftlab.cli import main

    over = [o for o in tiny_overrides if not o.startswith("model.name")] + [f"model.name={dropout_model_dir}",
                                                                           "train.example_dropout=true"]
    assert main(["train", "-", *over, "train.fused_attention=false"]) == 2
    assert "needs train.fused_attention" in capsys.readouterr().err.strip().splitlines()[-1]

"""Integration (issue 7): SIGKILL and resume on the packaged minilm-l6 (22M parameters), not only the tiny BERT.

64 rows, 8 steps of 8, fp32, one thread, a checkpoint every 2 steps. Killed after step 5 (its last checkpoint is step
4), resumed with `--resume`: the final weights are bitwise those of an uninterrupted run, and the example ids too.
"""
from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_rows, write_jsonl
from tests.unit.test_kill_resume import ckpt_steps, finish, launch, lines, train_ok, wait_for_steps

pytestmark = pytest.mark.integration

OVERRIDES = ["model.name=minilm-l6", "train.max_steps=8", "train.batch_size=8", "train.lr=5e-5",
             "train.precision=fp32", "train.num_threads=1", "train.progress=false", "train.tensorboard=false",
             "train.log_example_ids=true", "train.log_every=1", "train.eval_every=2", "train.keep_checkpoints=2"]


def test_packaged_model_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    d = [f"data.train={write_jsonl(tmp_path / 'train.jsonl', make_rows(64))}",
         f"data.dev={write_jsonl(tmp_path / 'dev.jsonl', make_rows(16, seed=1))}"]
    ref = train_ok(d + OVERRIDES + [f"output_dir={tmp_path / 'ref'}"], tmp_path)
    part = tmp_path / "part"
    overrides = d + OVERRIDES + [f"output_dir={part}"]
    proc = launch(["train", "-", *overrides], tmp_path, delay="1.0")
    wait_for_steps(proc, part, 5, timeout=300)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    assert ckpt_steps(part)[-1] == 4 and lines(part / "example_ids.jsonl") >= 5
    assert train_ok(overrides, tmp_path, resume=part) == part

    assert ckpt_steps(ref) == ckpt_steps(part) == [6, 8]
    for rel in ("checkpoints/step-0000008/model.safetensors", "best/model.safetensors"):
        a, b = load_file(str(ref / rel)), load_file(str(part / rel))
        assert a.keys() == b.keys() and len(a) > 100
        assert all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs"
    a, b = load_file(str(ref / "checkpoints/step-0000008/optimizer.safetensors")), \
        load_file(str(part / "checkpoints/step-0000008/optimizer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "example_ids.jsonl").read_text() == (ref / "example_ids.jsonl").read_text()
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(part / "metrics.jsonl") == strip(ref / "metrics.jsonl")
    ref_summary, part_summary = (json.loads((r / "summary.json").read_text()) for r in (ref, part))
    assert part_summary["steps"] == 8 and part_summary["dev_metrics"] == ref_summary["dev_metrics"]

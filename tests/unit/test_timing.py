"""The whole command's ledger (summary.json `timing`) and the exit without interpreter teardown (issue 22)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftlab import timing

REPO = Path(__file__).resolve().parents[2]


def test_process_age_is_the_kernels_view_of_this_process():
    age = timing.process_age()
    assert age is not None and age > 0
    before = age
    time.sleep(0.05)
    assert timing.process_age() >= before + 0.04


def test_phases_add_up_and_other_takes_the_rest():
    timing.reset()
    with timing.phase("data"):
        time.sleep(0.03)
    timing.add("loop", 0.01)
    time.sleep(0.03)
    out = timing.report()
    assert 0.03 <= out["data"] < 0.2 and out["loop"] == 0.01
    assert out["other"] >= 0.015
    assert abs(out["data"] + out["loop"] + out["other"] - out["process_seconds"]) < 0.01
    timing.reset()
    assert "data" not in timing.report()


def test_cli_run_splits_its_wall_time_and_leaves_its_outputs(tiny_overrides, tmp_path):
    """Through `python -m sftlab`: the ledger starts at the process start, its phases cover the run, and the
    fast exit still delivers the contract line and every file (summary written, metrics flushed)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SFTLAB_ALLOCATOR": "system"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *tiny_overrides, f"output_dir={out}",
                           "train.max_steps=4", "train.eval_every=2"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    t = json.loads((out / "summary.json").read_text())["timing"]
    for name in ("startup", "imports", "config", "data", "model", "loop", "eval", "save", "other"):
        assert name in t, name
    assert t["imports"] > 0.1 and t["loop"] > 0 and t["eval"] > 0 and t["save"] > 0
    assert abs(sum(v for k, v in t.items() if k != "process_seconds") - t["process_seconds"]) < 0.05
    assert t["process_seconds"] <= wall + 0.05  # (the kernel's start is 10 ms coarse)
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 3  # losses and two dev records, flushed


@pytest.mark.parametrize("clean", ["", "1"])
def test_leave_runs_exit_handlers_and_flushes(tmp_path, clean):
    script = tmp_path / "s.py"
    script.write_text(
        "import atexit, sys, torch\n"
        "from sftlab.cli import leave\n"
        f"atexit.register(lambda: open({str(tmp_path / 'handler')!r}, 'w').write('ran'))\n"
        "sys.stdout.write('unflushed line')\n"
        "leave(3)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SFTLAB_CLEAN_EXIT": clean}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed line"
    assert (tmp_path / "handler").read_text() == "ran"


def test_a_checkpoint_written_beside_the_evaluation_fails_loudly_and_leaves_no_complete_folder(tmp_path, monkeypatch):
    """start_checkpoint's thread (issue 22: tensor files written during the dev evaluation): an error there (a full
    disk) is raised by finish() in the training thread, and no folder is marked complete."""
    import torch

    import sftlab.train.checkpoint as ck

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_tensors", full_disk)
    pending = ck.start_checkpoint(tmp_path, 4, model, opt)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(tmp_path, 4, model, opt, sched, {}, 2, pending=pending)
    assert ck.complete_checkpoints(tmp_path) == []
    monkeypatch.undo()
    done = ck.save_checkpoint(tmp_path, 4, model, opt, sched, {}, 2, pending=ck.start_checkpoint(tmp_path, 4, model, opt))
    assert ck.complete_checkpoints(tmp_path) == [done]

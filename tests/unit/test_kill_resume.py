"""Exact resume after a real SIGKILL, atomic checkpoints, and graceful SIGTERM/SIGINT (issue 7).

Every run here is a real `python -m sftlab train` subprocess on the tiny BERT (fp32, 1 thread). A killed or stopped
run, resumed with `--resume`, must end bitwise equal (torch.equal) to one uninterrupted run with the same seed, and
must have seen the same example ids in the same order (RUN_DIR/example_ids.jsonl, `train.log_example_ids`).
`SFTLAB_TEST_STEP_DELAY` makes each step take 0.3 s so a kill lands where the test wants it: the test waits until the
run has logged N steps, then kills it while it sleeps before step N + 1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_rows, write_jsonl

DELAY = "0.3"
# 64 rows, batch 8: 8 steps an epoch, 16 in all; a checkpoint every 4 steps (keep 2), a metrics line every step.
BASE = ["train.epochs=2", "train.batch_size=8", "train.lr=1e-3", "train.precision=fp32", "train.progress=false",
        "train.num_threads=1", "train.tensorboard=false", "train.log_example_ids=true", "train.log_every=1",
        "train.eval_every=4", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("kill-data")
    return [f"model.name={tiny_model_dir}", f"data.train={write_jsonl(d / 'train.jsonl', make_rows(64))}",
            f"data.dev={write_jsonl(d / 'dev.jsonl', make_rows(32, seed=1))}"]


def launch(args: list[str], cwd: Path, delay: str | None = None, script: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SFTLAB_TEST_STEP_DELAY=delay or "")
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "sftlab"]
    return subprocess.Popen(head + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train_ok(overrides: list[str], cwd: Path, resume: Path | None = None) -> Path:
    args = ["train", "-", *overrides] + (["--resume", str(resume)] if resume else [])
    code, out, err = finish(launch(args, cwd))
    assert code == 0, err[-3000:]
    return Path(out.strip().splitlines()[-1])


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float = 180) -> None:
    """Until the run has logged `n` steps in example_ids.jsonl (it then sleeps DELAY before step n + 1)."""
    deadline = time.monotonic() + timeout
    while lines(run_dir / "example_ids.jsonl") < n:
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before step {n}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"no step {n} within {timeout}s"
        time.sleep(0.01)


def ckpt_steps(run_dir: Path) -> list[int]:
    from sftlab.train.checkpoint import complete_checkpoints

    return [int(p.name.split("-")[1]) for p in complete_checkpoints(run_dir)]


_refs: dict[tuple, Path] = {}


def reference(data: list[str], extra: list[str], tmp_path_factory) -> Path:
    """One uninterrupted run per configuration, shared by the tests of this module."""
    key = tuple(extra)
    if key not in _refs:
        out = tmp_path_factory.mktemp("ref") / "run"
        _refs[key] = train_ok(data + BASE + extra + [f"output_dir={out}"], out.parent)
    return _refs[key]


def assert_same_run(ref: Path, part: Path) -> None:
    """Bitwise-equal weights (last checkpoint and best/), the same example ids, the same metrics lines."""
    assert ckpt_steps(ref) == ckpt_steps(part)
    for rel in (Path("checkpoints") / f"step-{ckpt_steps(ref)[-1]:07d}" / "model.safetensors",
                *[p.relative_to(ref) for p in sorted((ref / "best").glob("*.safetensors"))]):
        a, b = load_file(str(ref / rel)), load_file(str(part / rel))
        assert a.keys() == b.keys(), rel
        assert all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs"
    assert (part / "example_ids.jsonl").read_text() == (ref / "example_ids.jsonl").read_text()
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(part / "metrics.jsonl") == strip(ref / "metrics.jsonl")
    assert json.loads((part / "summary.json").read_text())["steps"] == 16


KILLS = {  # id: (extra overrides, steps logged when killed, checkpoint the resume must start from)
    "mid-epoch": ([], 6, 4),
    "epoch-boundary": ([], 10, 8),
    "grad-accum": (["train.batch_size=4", "train.grad_accum=2"], 7, 4),
    "no-length-grouping": (["train.group_by_length=false"], 5, 4),
    "lora": (["strategy.name=lora"], 6, 4),
}


@pytest.mark.parametrize("case", KILLS, ids=list(KILLS))
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(data, tmp_path, tmp_path_factory, case):
    extra, kill_after, from_step = KILLS[case]
    ref = reference(data, extra, tmp_path_factory)
    part = tmp_path / "run"
    overrides = data + BASE + extra + [f"output_dir={part}"]
    proc = launch(["train", "-", *overrides], tmp_path, delay=DELAY)
    wait_for_steps(proc, part, kill_after)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    # Killed past its last checkpoint: the steps after it were logged and must be replayed, not duplicated.
    assert ckpt_steps(part)[-1] == from_step and lines(part / "example_ids.jsonl") >= kill_after > from_step
    state = json.loads((part / "checkpoints" / f"step-{from_step:07d}" / "state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == divmod(from_step, 8)  # 8 steps an epoch
    assert not (part / "summary.json").exists()
    assert train_ok(overrides, tmp_path, resume=part) == part
    assert_same_run(ref, part)


# --- atomic checkpoints ---------------------------------------------------------------------------------------

KILL_IN_SAVE = """
import os, signal, sys
import sftlab.train.checkpoint as ck
real = ck.save_tensors
def save_tensors(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if ".step-0000008.tmp" in path and "optimizer" in path:  # half-written, then a real SIGKILL
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
ck.save_tensors = save_tensors
from sftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(data, tmp_path, tmp_path_factory):
    """keep_checkpoints=1: the half-written step-8 checkpoint neither counts nor prunes step 4; resume ignores the
    .tmp folder, starts at step 4 and ends bitwise equal to the straight run."""
    ref = reference(data, [], tmp_path_factory)
    part = tmp_path / "run"
    overrides = data + BASE + ["train.keep_checkpoints=1", f"output_dir={part}"]
    proc = launch(["train", "-", *overrides], tmp_path, script=KILL_IN_SAVE)
    assert finish(proc)[0] == -signal.SIGKILL
    root = part / "checkpoints"
    assert ckpt_steps(part) == [4] and (root / "step-0000004" / "COMPLETE").is_file()
    assert (root / ".step-0000008.tmp" / "model.safetensors").is_file() and not (root / "step-0000008").exists()
    # The kept checkpoint is whole: it loads (safetensors checks every header and size).
    assert load_file(str(root / "step-0000004" / "optimizer.safetensors"))
    assert train_ok(overrides, tmp_path, resume=part) == part
    assert ckpt_steps(part) == [16] and not list(root.glob(".*.tmp"))
    a, b = (load_file(str(r / "checkpoints" / "step-0000016" / "model.safetensors")) for r in (ref, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "example_ids.jsonl").read_text() == (ref / "example_ids.jsonl").read_text()


# --- graceful stop --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_at_the_step_boundary_and_the_printed_command_resumes(data, tmp_path, tmp_path_factory, sig):
    ref = reference(data, [], tmp_path_factory)
    part = tmp_path / "run"
    proc = launch(["train", "-", *data, *BASE, f"output_dir={part}"], tmp_path, delay=DELAY)
    wait_for_steps(proc, part, 6)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == str(part)  # the scripting contract holds on a stop too
    stopped_at = lines(part / "example_ids.jsonl")
    assert stopped_at in (6, 7)  # the step under way when the signal came finished, nothing more
    assert ckpt_steps(part)[-1] == stopped_at  # a checkpoint at that boundary although no evaluation was due
    assert not (part / "summary.json").exists()
    command = f"sftlab train {part / 'config.yaml'} --resume {part}"
    assert f"stopped by {sig.name} at step {stopped_at}/16" in err and command in err
    assert "Traceback" not in err
    code, out, err = finish(launch(command.split()[1:], tmp_path))  # the printed command, as printed
    assert code == 0, err[-3000:]
    assert f"resumed from {part / 'checkpoints' / f'step-{stopped_at:07d}'}" in err
    assert_same_run(ref, part)


def test_pruning_waits_for_a_newer_complete_checkpoint(tiny_overrides, tmp_path, monkeypatch, capsys):
    """keep_checkpoints=2, a checkpoint every 2 steps: a checkpoint is deleted only while `keep` newer complete ones
    exist; an incomplete newer folder (renamed, no COMPLETE marker) and a stray .tmp neither count nor prune, and
    resume picks the newest complete checkpoint."""
    import shutil

    from sftlab.config import load_config
    from sftlab.train.checkpoint import complete_checkpoints
    from sftlab.train.loop import train

    threads = torch.get_num_threads()
    keep, deleted, real_rmtree = 2, [], shutil.rmtree

    def rmtree(path, *a, **k):
        path = Path(path)
        if (path / "COMPLETE").is_file():
            newer = [c for c in complete_checkpoints(path.parent.parent) if c.name > path.name]
            assert len(newer) >= keep, f"{path.name} pruned with only {len(newer)} newer complete checkpoint(s)"
            deleted.append(path.name)
        return real_rmtree(path, *a, **k)

    def plant_incomplete(step, scores):
        if step == 4:
            root = tmp_path / "run" / "checkpoints"
            (root / "step-0000099").mkdir()  # as if killed between the rename and the marker
            (root / "step-0000099" / "model.safetensors").write_bytes(b"torn")
            (root / ".step-0000010.tmp").mkdir()
        return False

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    cfg = load_config(None, tiny_overrides + ["train.epochs=1", "train.eval_every=2", f"train.keep_checkpoints={keep}",
                                              "train.num_threads=1", "train.tensorboard=false"])
    try:
        run_dir = train(cfg, on_eval=plant_incomplete)
        assert deleted == ["step-0000002", "step-0000004"]
        assert [p.name for p in complete_checkpoints(run_dir)] == ["step-0000006", "step-0000008"]
        assert (run_dir / "checkpoints" / "step-0000099").is_dir()  # ignored, never counted as the newest
        capsys.readouterr()
        train(cfg, resume=run_dir)
        assert f"resumed from {run_dir / 'checkpoints' / 'step-0000008'} at step 8/8" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)

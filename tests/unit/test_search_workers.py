"""Searches shared by workers through a real database: `sftlab tune` with 3 worker processes on a throw-away
PostgreSQL server (and on Optuna's journal file), one worker SIGKILLed mid-trial; `sftlab sweep --storage` the same
way. The equations: exactly --trials trials finish (complete or pruned), the killed trial is FAIL (never a stuck
RUNNING) and its parameters are retried, best.yaml trains as-is; a killed sweep worker's run resumes from its
checkpoint and ends as the uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.unit.test_tune import write_config

SRC = str(Path(__file__).resolve().parents[2] / "src")


def start_worker(cfg: Path, out: Path, storage: str, trials: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sftlab", "tune", str(cfg), "--trials", str(trials), "--out", str(out),
           "--storage", storage, "--study-name", "toy", "--heartbeat", "1", "train.epochs=3"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_at_first_trial(proc: subprocess.Popen, timeout: float = 300) -> str:
    """SIGKILL `proc` as soon as it announces its first trial (printed once the trial is RUNNING in the study,
    before its model loads: a tiny trial may take under a second); returns what it wrote."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if line.startswith("trial ") and " -> " in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "".join(seen)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the worker never started a trial:\n" + "".join(seen)[-2000:])


@pytest.mark.parametrize("backend", ["postgresql", "journal"])
def test_three_workers_one_killed_share_one_study(backend, tiny_overrides, tmp_path, request):
    storage = request.getfixturevalue("postgres_url") if backend == "postgresql" else \
        f"journal:{tmp_path / 'study.journal'}"
    cfg, out, trials = write_config(tmp_path, tiny_overrides), tmp_path / "tune", 4
    victim = start_worker(cfg, out, storage, trials)
    kill_at_first_trial(victim)
    workers = [start_worker(cfg, out, storage, trials) for _ in range(2)]
    outs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-3000:] for o in outs]
    assert {o[0].strip().splitlines()[-1] for o in outs} == {str(out / "best.yaml")}

    from sftlab.search_storage import open_storage

    study = optuna.load_study(study_name="toy", storage=open_storage(storage))
    by_state = {s: [t for t in study.trials if t.state.name == s] for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING",
                                                                           "WAITING")}
    assert len(by_state["COMPLETE"]) + len(by_state["PRUNED"]) == trials
    assert not by_state["RUNNING"] and not by_state["WAITING"]
    killed = [t for t in by_state["FAIL"] if "error" not in t.user_attrs]  # no heartbeat: failed by a worker
    assert len(killed) == 1, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params
    assert retry[0].state.name in ("COMPLETE", "PRUNED")
    from sftlab.cli import main

    assert main(["train", str(out / "best.yaml"), f"output_dir={tmp_path / 'best-run'}"]) == 0


def start_sweeper(overrides: list[str], out: Path, storage: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sftlab", "sweep", "-", *overrides, "train.epochs=2", "--over", "train.seed=0,1,2,3",
           "--out", str(out), "--storage", storage, "--heartbeat", "1"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("backend", ["postgresql"])  # the journal's heartbeat: the tune test above
def test_sweep_grid_shared_by_three_workers_one_killed(backend, tiny_overrides, tmp_path, request):
    """`sftlab sweep --storage`: 3 workers, one SIGKILLed at its first combination; every combination is trained
    and settled exactly once (the killed one retried by another worker), and every worker prints the same table."""
    from tests.unit.test_compare import drop_output_dir

    storage = request.getfixturevalue("postgres_url") if backend == "postgresql" else \
        f"journal:{tmp_path / 'sweep.journal'}"
    over, out = drop_output_dir(tiny_overrides), tmp_path / "grid"
    kill_at_first_trial(start_sweeper(over, out, storage))
    workers = [start_sweeper(over, out, storage) for _ in range(2)]
    outs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-3000:] for o in outs]
    assert outs[0][0] == outs[1][0] and "| 4 |" in outs[0][0]  # one setting, 4 seeds averaged

    import json

    from sftlab.search_storage import open_storage

    study = optuna.load_study(study_name=out.name, storage=open_storage(storage))
    settled = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["job"] for t in settled) == ["0", "1", "2", "3"]
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    killed = [t for t in study.trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    assert len(killed) == 1 and any(t.system_attrs.get("failed_trial") == killed[0].number for t in settled)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["0", "1", "2", "3"] and not [r for r in rows if "error" in r]


def test_a_killed_sweep_workers_run_is_resumed_from_its_checkpoint(tiny_overrides, tmp_path):
    """The worker dies mid-run: the kernel sends its child `sftlab train` SIGTERM (PR_SET_PDEATHSIG), which saves a
    checkpoint and exits; the next worker retries the combination with --resume from that checkpoint, and the
    result equals an uninterrupted run's."""
    from safetensors.torch import load_file

    from tests.unit.test_compare import drop_output_dir

    storage, out = f"journal:{tmp_path / 'grid.journal'}", tmp_path / "grid"
    over = drop_output_dir(tiny_overrides) + ["train.eval_every=2", "train.keep_checkpoints=20"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "SFTLAB_TEST_STEP_DELAY": "0.3"}
    cmd = [sys.executable, "-m", "sftlab", "sweep", "-", *over, "--over", "train.seed=0", "--out", str(out),
           "--storage", storage, "--heartbeat", "1"]
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoints = out / "0" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(checkpoints.glob("step-*/COMPLETE")):
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(3)  # the orphaned child saves its checkpoint on SIGTERM and exits
    assert not [p for p in os.listdir("/proc") if p.isdigit() and str(out / "variants") in
                open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")], "the child outlived its worker"
    stopped_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("step-*/COMPLETE"))
    env.pop("SFTLAB_TEST_STEP_DELAY")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "0" / "summary.json").read_text())
    assert resumed["steps"] == 16 and stopped_at < 16
    assert f"resumed from {checkpoints}" in done.stderr  # not retrained from scratch
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *over, "train.seed=0", f"output_dir={ref}"],
                   check=True, capture_output=True, env=env, timeout=300)
    a, b = (load_file(str(d / "checkpoints" / "step-0000016" / "model.safetensors")) for d in (out / "0", ref))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

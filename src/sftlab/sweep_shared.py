"""`sftlab sweep ... --storage URL`: one grid shared by any number of workers, on any machines, through an Optuna study.

Each combination is a trial carrying its name as the user attribute `job`; workers enqueue the combinations no
trial holds yet and pop waiting trials (Optuna's atomic pop), so each runs where a worker is free. Two workers may
enqueue the same combination at once; the lowest-numbered live trial of a combination owns it and the others end
as surplus (FAIL, "not needed"), never trained. OUT must be one folder all workers see (a shared filesystem): the
runs are written there as in a local sweep, and every worker writes the same sweep.json/md when the grid is done.
A worker killed mid-run stops its heartbeat: its trial is failed and retried by another worker, whose child resumes
the run from its last checkpoint (the killed worker's child gets SIGTERM from the kernel, the same graceful stop
as Ctrl-C, so the checkpoint is there). A run that fails on its own (exit status) is not retried: it is a result.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import ConfigError
from .search_storage import fail_stale, open_study, run_one_trial

POLL_S = 5.0
SURPLUS = "not needed: another trial holds this combination"


class _Skip(Exception):
    """This trial is surplus or its run failed: recorded FAIL with the reason, the worker goes on."""


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux prctl PR_SET_PDEATHSIG)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def run_shared(jobs: list[str], out: Path, storage: str, study_name: str, heartbeat: int, env: dict) -> dict:
    """Run this worker's share of `jobs` (variants already under OUT/variants/); returns {job: row} for all."""
    import optuna
    from optuna.trial import TrialState

    from .sweep import row_of

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(storage, study_name, "maximize", heartbeat)
    saved = study.user_attrs.get("sftlab_jobs")
    if saved is None:
        study.set_user_attr("sftlab_jobs", jobs)
    elif saved != jobs:
        raise ConfigError(f"study {study_name!r} in {storage} holds another grid ({len(saved)} combinations); "
                          "give every worker the same --over values, or use another --study-name")
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)

    def settled(t) -> bool:  # holds its combination's result: a finished run, or a run that failed by itself
        return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "row" in t.user_attrs)

    def objective(trial) -> float:
        job = trial.user_attrs.get("job")
        earlier = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("job") == job and
                   t.number < trial.number and (t.state in live or settled(t))]
        if job is None or earlier:
            trial.set_user_attr("error", SURPLUS)
            raise _Skip(SURPLUS)
        run_dir = out / job
        print(f"trial {trial.number}: {job} -> {run_dir}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "sftlab", "train", str(out / "variants" / f"{job}.yaml")]
        cmd += ["--resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else [f"output_dir={run_dir}"]
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            row = {"name": job, "error": f"exit {code} after {time.time() - start:.0f}s", "run_dir": str(run_dir)}
            trial.set_user_attr("row", row)
            trial.set_user_attr("error", row["error"])
            raise _Skip(row["error"])
        row = row_of(job, run_dir, usage.ru_maxrss / 1024)
        trial.set_user_attr("row", row)
        return row["metric"] if row["metric"] is not None else float("nan")

    waiting_said = False
    while True:
        fail_stale(study)  # trials of killed workers: failed, and enqueued again
        trials = study.get_trials(deepcopy=False)
        done = {t.user_attrs["job"] for t in trials if settled(t) and "job" in t.user_attrs}
        if done >= set(jobs):
            break
        held = {t.user_attrs.get("job") for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
        for job in jobs:
            if job not in done and job not in held:
                study.enqueue_trial({}, user_attrs={"job": job})
        if not any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            if not waiting_said:
                print("waiting for the combinations running in other workers", file=sys.stderr, flush=True)
                waiting_said = True
            time.sleep(POLL_S)
            continue
        waiting_said = False
        run_one_trial(study, objective, (_Skip,), heartbeat)  # False: failed by another worker, retried
    rows = {}
    for t in study.get_trials(deepcopy=False):
        if settled(t) and "job" in t.user_attrs:
            rows.setdefault(t.user_attrs["job"], t.user_attrs["row"])
    return rows

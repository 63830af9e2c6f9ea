"""Shared by the side-by-side benchmarks: run one side in its own child process and read its peak RSS."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str], env: dict[str, str], capture: bool) -> tuple[int, str, float]:
    """Start cmd, wait for it with wait4 and return (exit code, stdout, peak RSS MB of that child alone).

    RUSAGE_CHILDREN would accumulate over every child reaped so far; wait4 gives this one's own ru_maxrss.
    Child stdout goes to our stderr (or is captured) so that our stdout carries only the tables."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE if capture else sys.stderr)
    stdout = proc.stdout.read() if capture else ""  # read to EOF before reaping, or a full pipe deadlocks
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    if capture:
        sys.stderr.write(stdout)
    return proc.returncode, stdout, usage.ru_maxrss / 1024  # KiB on Linux


def median_of(runs: list[dict], tool: str, keys: tuple[str, ...]) -> dict | None:
    """Per-key medians over one tool's runs (None if it has none)."""
    mine = [r for r in runs if r["tool"] == tool]
    return {k: statistics.median(r[k] for r in mine) for k in keys} if mine else None

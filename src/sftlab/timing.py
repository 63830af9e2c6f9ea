"""Where a command's wall time goes (issue 22: a user times the whole command, not the loop).

A process-wide ledger of named phases, written into summary.json as `timing`: process start (as the kernel
recorded it, so the interpreter's own start and the jemalloc re-exec count) to the summary, split into
`startup` (interpreter + re-exec, up to `python -m sftlab`'s first line), `imports` (to the verb's first line
of work), `config`, `data` (reading and tokenizing), `model` (loading, strategy, optimizer), `loop` (the training
steps: summary.train_seconds), `eval` (dev evaluations during training), `save` (checkpoints and best/), `test`
and `other` (what no phase claims). Times are wall seconds on this process; the exit itself (interpreter
teardown) happens after the summary and is only visible from outside (benchmarks/hf_trainer_classification.py).
Not kept across --resume: the ledger is this process's.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

_totals: dict[str, float] = {}
_marks: dict[str, float] = {}
_since = time.perf_counter()  # in-process callers (tune trials, tests): the ledger's start, moved by reset()


def process_age() -> float | None:
    """Seconds since the kernel started this process (exec keeps the start time), or None off Linux.
    /proc/uptime and the start tick share one clock at 10 ms resolution."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the (comm) field
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def mark(name: str) -> None:
    """A point in time, first one wins (startup: `python -m sftlab` reached; imports: the verb began)."""
    _marks.setdefault(name, time.perf_counter())


def add(name: str, seconds: float) -> None:
    _totals[name] = _totals.get(name, 0.0) + seconds


@contextmanager
def phase(name: str):
    tick = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - tick)


def report() -> dict[str, float]:
    """{phase: seconds} to now, `other` the rest: from process start under the CLI, else from the last reset()."""
    age, now = process_age(), time.perf_counter()
    out = {}
    if "main" in _marks and age is not None:
        out["startup"] = _marks["main"] - (now - age)
        if "verb" in _marks:
            out["imports"] = _marks["verb"] - _marks["main"]
    else:
        age = now - _since
    out.update(_totals)
    out = {k: round(max(v, 0.0), 3) for k, v in out.items()}
    out["other"] = round(max(0.0, age - sum(out.values())), 3)
    out["process_seconds"] = round(age, 3)
    return out


def reset() -> None:
    """In-process reruns (tune trials, tests) start their own ledger of phases; process marks stay."""
    global _since
    _totals.clear()
    _since = time.perf_counter()

"""Shared by the side-by-side benchmarks: run one side in its own child process and read its peak RSS."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str], env: dict[str, str], capture: bool) -> tuple[int, str, float]:
    """Start cmd, wait for it with wait4 and return (exit code, stdout, peak RSS MB of that child alone)."""
    return run_timed(cmd, env, capture)[:3]


def run_timed(cmd: list[str], env: dict[str, str], capture: bool) -> tuple[int, str, float, float]:
    """run_child's figures and the child's whole wall time, start to exit as /usr/bin/time counts it (issue 22: a
    user times the command, imports, loading, evaluation, saving and interpreter exit included).

    RUSAGE_CHILDREN would accumulate over every child reaped so far; wait4 gives this one's own ru_maxrss.
    Child stdout goes to our stderr (or is captured) so that our stdout carries only the tables."""
    import time

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE if capture else sys.stderr)
    stdout = proc.stdout.read() if capture else ""  # read to EOF before reaping, or a full pipe deadlocks
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    if capture:
        sys.stderr.write(stdout)
    return proc.returncode, stdout, usage.ru_maxrss / 1024, wall  # KiB on Linux


def median_of(runs: list[dict], tool: str, keys: tuple[str, ...]) -> dict | None:
    """Per-key medians over one tool's runs (None if it has none)."""
    mine = [r for r in runs if r["tool"] == tool]
    return {k: statistics.median(r[k] for r in mine) for k in keys} if mine else None


def matmul_peak_gflops(dtype_name: str = "bfloat16", n: int = 2048, reps: int = 8) -> float:
    """Best-of-`reps` GFLOP/s of one n x n x n matmul in this process (torch's own thread count): the machine's
    practical peak, measured in the same run as the benchmark it normalises."""
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def training_flops(n_params_nonembedding: int, n_layers: int, d_model: int, lengths: list[int]) -> float:
    """Model FLOPs of one pass over sequences of these lengths, forward + backward (PaLM appendix B /
    Chinchilla convention): 6 x non-embedding parameters per token, plus attention's score and value matmuls,
    12 x layers x d_model x s per token of a length-s sequence. Useful work only: padding is not counted."""
    tokens = sum(lengths)
    attention = sum(12 * n_layers * d_model * s * s for s in lengths)
    return 6 * n_params_nonembedding * tokens + attention


def machine_peak() -> tuple[float, str, dict[str, float]]:
    """The faster of the fp32 and bf16 matmul peaks here: (GFLOP/s, its dtype, both). Which one is faster depends
    on the CPU (AMX: bf16 ~3x; AVX-512 BF16 without AMX: fp32 ~2x), so utilisation is against the better one."""
    both = {name: matmul_peak_gflops(name) for name in ("float32", "bfloat16")}
    best = max(both, key=both.get)
    return both[best], {"float32": "fp32", "bfloat16": "bf16"}[best], both


def utilisation_line(flops: float, seconds: float, peak_gflops: float, label: str = "bf16") -> str:
    achieved = flops / seconds / 1e9
    return f"{achieved:.1f} GFLOP/s = {100 * achieved / peak_gflops:.1f}% of the {label} matmul peak ({peak_gflops:.0f})"


def ratio_rows(med: dict, refs: dict[str, str], speed: str, diff: str, columns: int) -> dict:
    """Print a table row of sftlab / each reference side in `refs` (side -> label) that ran: `speed` and peak RSS
    as ratios, `diff` (a quality metric) as a difference; the fastest reference is starred and its ratios returned
    (with "against": its side), so that sftlab is judged against the best the reference tool did on this machine.
    `columns`: cells after the first four, left empty."""
    sides = [side for side in refs if side in med]
    if "sftlab" not in med or not sides:
        return {}
    best = max(sides, key=lambda side: med[side][speed])
    s, out = med["sftlab"], {}
    for side in sides:
        ref = med[side]
        r = {speed: s[speed] / ref[speed], "peak_rss_mb": s["peak_rss_mb"] / ref["peak_rss_mb"],
             f"{diff}_diff": s[diff] - ref[diff]}
        b = "**" if side == best else ""
        if b:
            out = {**r, "against": side}
        print(f"| {b}sftlab / {refs[side]}{' (the faster reference here)' if b else ''}{b} | {b}{r[speed]:.2f}x{b} | "
              f"| {b}{r['peak_rss_mb']:.2f}x{b} | {b}{r[f'{diff}_diff']:+.4f}{b} |" + " |" * columns)
    return out

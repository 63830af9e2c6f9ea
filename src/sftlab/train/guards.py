"""Small guards the training loop leans on: graceful stop, out-of-memory detection, finiteness, log replay.

Kept out of loop.py so the loop still reads top to bottom; each helper is a few lines and has no state of its own
beyond what it says (docs/reliability.md).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import threading
from pathlib import Path

import torch


class StopSignals:
    """While active (and only in the main thread), SIGTERM/SIGINT set `received` instead of killing the process:
    the loop saves a checkpoint at the next step boundary and returns. A second signal aborts at once
    (KeyboardInterrupt). The previous handlers come back on exit."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"{self.received}: stopping after the current step and saving a checkpoint "
              "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()


def is_oom(err: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures (torch.OutOfMemoryError, or the RuntimeError text of older paths)."""
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "DefaultCPUAllocator: can't allocate memory" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`). CPU tensors of many shapes (a new sequence length
    every batch) fragment glibc's heap: RSS between steps was ~850 MB for ~700 MB live. Called at phase boundaries
    (before training, around evaluations), where it costs a few ms; per step it cost ~30% of step time for ~5% RSS."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def nonfinite_params(model) -> list[str]:
    """Names of parameters holding NaN or inf (checked before anything is saved; one host sync when all are fine)."""
    named = list(model.named_parameters())
    if not named or bool(torch.stack([torch.isfinite(p).all().to(named[0][1].device) for _, p in named]).all()):
        return []
    return [n for n, p in named if not bool(torch.isfinite(p).all())]


def grad_norm(params) -> torch.Tensor:
    """Total L2 norm of the gradients without clipping (the finiteness check when train.max_grad_norm is null)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def trim_log(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (the resumed checkpoint's): a killed run may have logged steps that the
    resumed one replays. A torn last line (killed mid-write) goes too. Atomic: tmp file, then rename."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not line.endswith("\n") or record.get("step", 0) > step:
            break
        keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def step_delay_for_tests() -> float:
    """SFTLAB_TEST_STEP_DELAY=seconds: sleep before every optimizer step. Only for tests that kill or signal a run
    mid-way (tests/unit/test_kill_resume.py); unset in normal use, and it changes no result."""
    return float(os.environ.get("SFTLAB_TEST_STEP_DELAY") or 0)

"""Two CPU processes (DDP on gloo, launched by torchrun around accelerate) == one process with the same
step batch: 2 x batch 4 gives the weights of 1 x batch 8 (gradients all-reduced to the same mean)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(run_dir):
    return load_file(str(sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


def test_two_processes_equal_one(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith(("output_dir", "train.batch_size"))] + ["train.epochs=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "sftlab", "train", "-", *common, "train.batch_size=4",
           f"output_dir={two}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(two)
    one = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *common, "train.batch_size=8",
                           f"output_dir={one}"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wa, wb = ckpt(two), ckpt(one)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-5, worst
    import json

    assert json.loads((two / "summary.json").read_text())["processes"] == 2

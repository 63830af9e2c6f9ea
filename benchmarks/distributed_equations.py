"""The scale-out equations on the packaged encoder (issue 21): one global batch of 8, trained as 1 process, as
1 node x 2 processes (DDP), as 2 nodes x 1 process on 127.0.0.1 (a real c10d rendezvous), and sharded on 2
processes with FSDP, ZeRO-2 and ZeRO-3; each run's loss curve and final weights against the 1-process run.

    python benchmarks/distributed_equations.py [--steps 8] [--out runs/dist-eq]

minilm-l6 on the shipped demo set, `train.example_dropout: true` (dropout masks from (seed, step, example), so the
equations hold with BERT's dropout; docs/distributed.md) and `train.lazy_embeddings: false` (the sharded
strategies update embeddings densely; the others are set alike so that all six run the same optimizer). The tests
check the same equations on a tiny model (tests/unit/test_multinode.py, test_fsdp.py, test_deepspeed.py); this
prints them for the real one, with each run's wall time (these are 2 processes on one machine's cores: the times
say what start-up and communication cost, not what a cluster gives).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nodes: int, procs: int, port: int) -> list[str]:
    if nodes == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                str(port), "-m", "sftlab"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(procs),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "dist-eq", "-m", "sftlab"]


def run(name: str, out: Path, common: list[str], nodes: int, procs: int, extra: list[str]) -> float:
    run_dir = out / name
    batch = 8 // (nodes * procs)
    argv = ["train", "-", *common, f"train.batch_size={batch}", *extra, f"output_dir={run_dir}", "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // (nodes * procs))),
               HF_HUB_OFFLINE="1")
    tick = time.perf_counter()
    if nodes * procs == 1:
        cmds = [[sys.executable, "-m", "sftlab", *argv]]
    else:
        port = free_port()
        cmds = [torchrun(nodes, procs, port) + argv for _ in range(nodes)]
    children = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for c in cmds]
    for c in children:
        _, err = c.communicate(timeout=900)
        if c.returncode:
            sys.exit(f"{name} failed:\n{err[-2000:]}")
    return time.perf_counter() - tick


def losses(run_dir: Path) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r and "split" not in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="runs/dist-eq")
    args = ap.parse_args()
    out = Path(args.out)
    demo = REPO / "src" / "sftlab" / "demo"
    common = ["model.name=minilm-l6", f"data.train={demo / 'train.jsonl'}", f"data.dev={demo / 'dev.jsonl'}",
              f"train.max_steps={args.steps}", "train.log_every=1", f"train.eval_every={args.steps}",
              "train.example_dropout=true", "train.lazy_embeddings=false", "train.precision=fp32",
              "train.progress=false", "train.seed=0"]
    setups = [("1 process", 1, 1, []), ("1 node x 2 (DDP)", 1, 2, []), ("2 nodes x 1 (DDP, c10d)", 2, 1, []),
              ("FSDP, 2 processes", 1, 2, ["train.distributed.strategy=fsdp"]),
              ("ZeRO-2, 2 processes", 1, 2, ["train.distributed.strategy=deepspeed"]),
              ("ZeRO-3, 2 processes", 1, 2, ["train.distributed.strategy=deepspeed",
                                             "train.distributed.zero_stage=3"])]
    rows = []
    for i, (label, nodes, procs, extra) in enumerate(setups):
        seconds = run(f"run{i}", out, common, nodes, procs, extra)
        rows.append((label, out / f"run{i}", seconds))
        print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    ref_loss, ref_w = losses(rows[0][1]), load_file(str(rows[0][1] / "best" / "model.safetensors"))
    print(f"minilm-l6, demo set, global batch 8, {args.steps} steps, fp32, example_dropout\n")
    print("| run | max abs loss diff vs 1 process | max abs weight diff (best/) | wall s |")
    print("|---|---:|---:|---:|")
    figures = {}
    for label, run_dir, seconds in rows:
        curve, w = losses(run_dir), load_file(str(run_dir / "best" / "model.safetensors"))
        assert len(curve) == len(ref_loss) and w.keys() == ref_w.keys(), label
        dl = max(abs(a - b) for a, b in zip(curve, ref_loss))
        dw = max((w[k].float() - ref_w[k].float()).abs().max().item() for k in w)
        figures[label] = {"loss_diff": dl, "weight_diff": dw, "seconds": round(seconds, 1)}
        print(f"| {label} | {dl:.2e} | {dw:.2e} | {seconds:.1f} |")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""What an adaptation step costs next to a plain SFT step with the same source batch (issue 17's goal: <= 2.1x).

Work: minilm-l6 on the books reviews (source, labelled) with the kitchen reviews' text as `data.unlabelled` (target),
max_length 128, batch 32, `--steps` optimizer steps, precision auto, no dev evaluation. Interleaved `--runs` times,
each side in its own process: plain SFT, then objective mmd, dann and udalm at their default weights. Printed:
seconds per step from the loop's own figure (summary.json: training steps only; source examples/s, so the ratio is
the step-time ratio for the same source batch), the child's peak RSS, and each objective's ratio to SFT.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/adapt_step.py [--steps 30] [--runs 2] [--max-length 128]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import run_child

SIDES = ("sft", "mmd", "dann", "udalm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    if not os.environ.get("SFTLAB_DATA_DIR"):
        sys.exit("set SFTLAB_DATA_DIR to the folder holding reviews/ (e.g. ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="adapt-step-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = [sys.executable, "-m", "sftlab", "train", "-", "model.name=minilm-l6", "task=classification",
              "data.text=text", "data.label=label", f"data.max_length={args.max_length}",
              "data.train=reviews/books/train.jsonl", "data.dev=null", f"train.max_steps={args.steps}",
              "train.batch_size=32", "train.lr=5e-5", "train.seed=0", "train.progress=false",
              "train.tensorboard=false", "train.keep_checkpoints=1"]
    rows = []
    for k in range(args.runs):
        for side in SIDES:
            extra = [] if side == "sft" else [f"objective.name={side}", "data.unlabelled=reviews/kitchen/train.jsonl"]
            out = work / f"{side}-{k}"
            code, _, peak = run_child(common + extra + [f"output_dir={out}"], env, capture=True)
            assert code == 0, f"{side} run {k} failed"
            s = json.loads((out / "summary.json").read_text())
            rows.append({"side": side, "ex_s": s["train_examples_per_s"], "peak_mb": peak})
            print(f"{side} run {k}: {rows[-1]['ex_s']:.1f} source examples/s, peak {peak:.0f} MB", file=sys.stderr)
    med = {side: {key: statistics.median(r[key] for r in rows if r["side"] == side) for key in ("ex_s", "peak_mb")}
           for side in SIDES}
    print("| side | source examples/s (runs) | step cost vs SFT | peak RSS MB |\n|---|---|---:|---:|")
    for side in SIDES:
        runs = ", ".join(f"{r['ex_s']:.1f}" for r in rows if r["side"] == side)
        print(f"| {side} | {med[side]['ex_s']:.1f} ({runs}) | {med['sft']['ex_s'] / med[side]['ex_s']:.2f}x | "
              f"{med[side]['peak_mb']:.0f} |")
    print(json.dumps({side: {"ratio": med["sft"]["ex_s"] / med[side]["ex_s"], **med[side]} for side in SIDES}))


if __name__ == "__main__":
    main()

"""What distillation costs per step, next to plain SFT of the same student (issue 16's goal: at most 1.15x).

Work: SST-2 train rows (`--rows`, default 2000) and dev, minilm-l6 student, batch 32, 1 epoch, lr 1e-4, precision
auto. The teacher is a minilm-l6 run on the same rows (trained first, once; any fine-tuned classifier would do: with
the cache the teacher's size only changes the one-time pass). Then, interleaved `--runs` times, each in its own
process: plain SFT, and `objective.name=distill` (alpha 0.5, T 2) with the teacher's logits already cached. Printed:
the loop's examples/s (summary.json: training steps only) and the child's peak RSS for each side, their medians, the
step-cost ratio distill / SFT, and the one-time teacher pass (rows/s, from its log line).

`--decoder`: the same for token-level KD of a causal LM: the half-depth smollm2 student of
configs/instruct/sst2_student.yaml (SST-2 as chat, packed), the base smollm2-135m-instruct as teacher (top-32
next-token distributions cached; any teacher would do, it only changes the one-time pass), `--rows` default 400.

    python benchmarks/distill_step.py [--rows 2000] [--runs 3] [--data-dir ../shared/data] [--decoder]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, run_child

SFTLAB = [sys.executable, "-m", "sftlab", "train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int)
    ap.add_argument("--decoder", action="store_true", help="token-level KD of the half-depth smollm2 student")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    n_rows = args.rows or (400 if args.decoder else 2000)
    train = SFTLAB + ["configs/instruct/sst2_student.yaml" if args.decoder else "configs/glue/sst2.yaml"]
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    env = dict(os.environ, SFTLAB_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1")
    common = [f"data.dir={args.data_dir}", f"data.limit_train={n_rows}", "train.epochs=1", "train.lr=1e-4",
              "train.progress=false", "train.tensorboard=false", "train.keep_checkpoints=1"]
    if args.decoder:  # dev: the answer's loss on 200 rows (the step is what is measured)
        common.append("data.limit_dev=200")
        teacher = "smollm2-135m-instruct"
    else:
        common.append("train.batch_size=32")
        teacher = work / "teacher"
        code, _, _ = run_child(train + common + [f"output_dir={teacher}"], env, capture=True)
        assert code == 0, "teacher run failed"
    kd = ["objective.name=distill", f"objective.teacher={teacher}", "objective.alpha=0.5", "objective.temperature=2"]
    # the one-time teacher pass: a throwaway distill run whose log says how fast the teacher scored the rows
    warm = subprocess.run(train + common + kd + ["train.max_steps=1", f"output_dir={work / 'warm'}"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-2000:]
    rows = []
    for k in range(args.runs):
        for side, extra in (("sft", []), ("distill", kd)):
            out = work / f"{side}-{k}"
            code, _, peak = run_child(train + common + extra + [f"output_dir={out}"], env, capture=True)
            assert code == 0, f"{side} run {k} failed"
            s = json.loads((out / "summary.json").read_text())
            dev = s.get("dev_metrics") or {}
            rows.append({"side": side, "ex_s": s["train_examples_per_s"], "peak_mb": peak,
                         "dev": dev.get("accuracy", dev.get("loss"))})
            print(f"{side} run {k}: {rows[-1]['ex_s']:.1f} examples/s, peak {peak:.0f} MB, dev {rows[-1]['dev']}",
                  file=sys.stderr)
    med = {side: {key: statistics.median(r[key] for r in rows if r["side"] == side) for key in ("ex_s", "peak_mb")}
           for side in ("sft", "distill")}
    metric = "loss" if args.decoder else "accuracy"
    print(f"| side | examples/s (runs) | peak RSS MB | dev {metric} |\n|---|---|---:|---:|")
    for side in ("sft", "distill"):
        runs = ", ".join(f"{r['ex_s']:.1f}" for r in rows if r["side"] == side)
        dev = [r["dev"] for r in rows if r["side"] == side][0]
        print(f"| {side} | {med[side]['ex_s']:.1f} ({runs}) | {med[side]['peak_mb']:.0f} | {dev} |")
    print(f"step cost distill / sft: {med['sft']['ex_s'] / med['distill']['ex_s']:.3f}x "
          f"(goal <= 1.15x); peak RSS {med['distill']['peak_mb'] / med['sft']['peak_mb']:.2f}x")
    found = re.search(r"teacher (logits|top-\d+): \d+ rows[^\n]*", warm.stderr)
    print(f"one-time teacher pass: {found.group(0) if found else 'see the warm-up run log'}")


if __name__ == "__main__":
    main()

"""Issue 18's performance goal: a multi-task run's examples/s within 10% of single-task runs on the same examples.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/multitask_step.py [--rows 2000] [--runs 2]

Work: minilm-l6, three GLUE tasks of different shapes (SST-2 single sentences, RTE long pairs, STS-B pairs with a
regression head), the first `--rows` training rows of each, 1 epoch, batch 32, no dev evaluation. Side A: the three
single-task runs one after the other (their examples over their summed training seconds); side B: one multitask run
over the same rows (proportional sampler: one epoch is the same step batches the three runs take). Interleaved
`--runs` times, each run in its own process; medians. The loop's own figures (summary.json: training steps only).
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

TASKS = {"sst2": {"task": "classification", "train": "glue/sst2/train.tsv", "text": "sentence"},
         "rte": {"task": "classification", "train": "glue/rte/train.tsv", "text": "sentence1", "text_pair": "sentence2"},
         "stsb": {"task": "regression", "train": "glue/stsb/train.tsv", "text": "sentence1", "text_pair": "sentence2",
                  "label": "score"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if not os.environ.get("SFTLAB_DATA_DIR"):
        sys.exit("set SFTLAB_DATA_DIR to the folder holding glue/ (e.g. ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="mt-step-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = [sys.executable, "-m", "sftlab", "train", "-", "model.name=minilm-l6", "data.max_length=256",
              "train.epochs=1", "train.batch_size=32", "train.lr=5e-5", "train.seed=0", "train.progress=false",
              "train.tensorboard=false", "train.keep_checkpoints=1"]

    def run(out: Path, extra: list[str]) -> dict:
        code, _, _ = run_child(common + extra + [f"output_dir={out}"], env, capture=True)
        assert code == 0, f"{out} failed"
        s = json.loads((out / "summary.json").read_text())
        return {"examples": s["examples"], "seconds": s["train_seconds"]}

    rates = {"single": [], "multi": []}
    for k in range(args.runs):
        parts = []
        for name, t in TASKS.items():
            cols = [f"data.{c}={v}" for c, v in t.items() if c != "task"]
            parts.append(run(work / f"single-{name}-{k}", [f"task={t['task']}", *cols, "data.dev=null",
                                                          f"data.limit_train={args.rows}"]))
        rates["single"].append(sum(p["examples"] for p in parts) / sum(p["seconds"] for p in parts))
        tasks = {n: {**t, "limit_train": args.rows} for n, t in TASKS.items()}
        m = run(work / f"multi-{k}", ["task=multitask", f"tasks={json.dumps(tasks)}"])
        rates["multi"].append(m["examples"] / m["seconds"])
        print(f"run {k}: single {rates['single'][-1]:.1f}, multi {rates['multi'][-1]:.1f} examples/s", file=sys.stderr)
    med = {s: statistics.median(v) for s, v in rates.items()}
    print("| side | examples/s (runs) |\n|---|---|")
    for s, v in rates.items():
        print(f"| {s} | {med[s]:.1f} ({', '.join(f'{x:.1f}' for x in v)}) |")
    print(f"multi / single: {med['multi'] / med['single']:.3f}")
    print(json.dumps({"median": med, "runs": rates}))


if __name__ == "__main__":
    main()

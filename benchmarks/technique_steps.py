"""Every technique of the fusion wave next to the plain SFT step on the same rows: one table (issue 22, item 3).

    python benchmarks/technique_steps.py [--rows 2000] [--runs 3] [--data-dir ../shared/data] [--json OUT]

Work: minilm-l6, the first --rows SST-2 train rows, batch 32, max_length 128, 1 epoch, precision auto, no dev
evaluation, each side in its own process, interleaved --runs times; medians. Sides:
  sft        the plain step (the reference)
  distill    objective distill (alpha 0.5, T 2) from a minilm-l6 teacher trained once on the same rows; its logits
             are cached before training (the one-time pass is the `objective` phase of the whole command)
  masked_lm  task masked_lm on the same rows' text (continued pre-training)
  multitask  two classification heads, each task the first rows/2 rows (one task's batch per step)
  mmd, dann, udalm  the adaptation objectives at their default weights, the next --rows train rows' text as
             data.unlabelled (a step = a source batch + a target batch: the ratio is per source batch)
  self-train the pseudo-labelling pass of `sftlab self-train` (predict_examples on --rows unlabelled rows with the
             teacher run's best model), rows/s, in this process
Printed per side: loop examples/s (summary.json), its step cost as a ratio to SFT's (SFT examples/s / side's), the
child's peak RSS and whole-command seconds; the goal each technique's issue set, where it set one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_timed  # noqa: E402

GOALS = {"distill": "<= 1.15x (issue 16)", "mmd": "<= 2.1x (issue 17)", "dann": "<= 2.1x (issue 17)",
         "udalm": "<= 2.1x (issue 17)", "multitask": "<= 1.1x (issue 18)"}


def sides(rows: int, glue: Path, teacher: Path) -> dict[str, list[str]]:
    train = str(glue / "sst2" / "train.tsv")
    half = rows // 2
    target = glue.parent / "sst2_target.jsonl"  # (written by main: rows rows..2*rows of train.tsv, text only)
    adapt = [f"data.unlabelled={target}"]
    return {
        "sft": [],
        "distill": ["objective.name=distill", f"objective.teacher={teacher / 'best'}"],
        "masked_lm": ["task=masked_lm"],  # (the label column is read past)
        "multitask": ["task=multitask", "data.train=null", "data.dev=null", "data.limit_train=null",
                      *[f"tasks.{t}.{k}={v}" for t in ("a", "b") for k, v in
                        (("train", train), ("text", "sentence"), ("label", "label"), ("limit_train", half))]],
        "mmd": ["objective.name=mmd", *adapt],
        "dann": ["objective.name=dann", *adapt],
        "udalm": ["objective.name=udalm", *adapt],
    }


def train(args, extra: list[str], out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "sftlab", "train", "configs/glue/sst2.yaml", f"data.dir={args.data_dir}",
           f"data.limit_train={args.rows}", "train.epochs=1", "train.batch_size=32", "data.max_length=128",
           "train.eval_every=null", "data.dev=null", "train.progress=false", *extra, f"output_dir={out}"]
    rc, stdout, rss, wall = run_timed(cmd, env, capture=True)
    if rc != 0:
        sys.exit(f"failed (exit {rc}): {' '.join(cmd)}")
    s = json.loads((out / "summary.json").read_text())
    return {"examples_per_s": s["train_examples_per_s"], "peak_rss_mb": rss, "command_seconds": wall,
            "precision": s.get("precision"), "timing": s.get("timing", {})}


def pseudo_label_pass(teacher: Path, texts: list[str]) -> float:
    """rows/s of self-training's labelling pass (the same call `sftlab self-train` makes), in this process."""
    from sftlab.data.examples import Example
    from sftlab.eval.evaluate import load_trained, predict_examples
    from sftlab.precision import resolve

    loaded = load_trained(str(teacher / "best"))
    pool = [Example(text=t, text_pair=None, label=None, line=i + 1) for i, t in enumerate(texts)]
    list(predict_examples(loaded, pool[:64], bf16=resolve("auto"), progress=None))  # warm-up
    start = time.perf_counter()
    list(predict_examples(loaded, pool, bf16=resolve("auto"), progress=None))
    return len(pool) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SFTLAB_DATA_DIR", REPO.parent / "shared" / "data")))
    p.add_argument("--only", default=None, help="comma-separated sides (default: all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    glue = args.data_dir / "glue"
    threads = str(os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="sftlab-techniques-") as tmp:
        tmp = Path(tmp)
        lines = (glue / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
        target_texts = [line.split("\t")[0] for line in lines[args.rows:2 * args.rows]]
        work = Path(tmp) / "glue"
        work.mkdir()
        (work / "sst2").symlink_to(glue / "sst2")
        (Path(tmp) / "sst2_target.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in target_texts),
                                                     encoding="utf-8")
        args.data_dir = Path(tmp)
        teacher = tmp / "teacher"
        print("[bench] teacher (once)", file=sys.stderr, flush=True)
        train(args, [], teacher, env)
        todo = sides(args.rows, work, teacher)
        if args.only:
            todo = {k: v for k, v in todo.items() if k in args.only.split(",") or k == "sft"}
        runs: dict[str, list[dict]] = {k: [] for k in todo}
        for i in range(args.runs):
            for name, extra in todo.items():
                print(f"[bench] run {i + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
                runs[name].append(train(args, extra, tmp / f"{name}-{i}", env))
        labelling = [pseudo_label_pass(teacher, target_texts) for _ in range(args.runs)]
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("examples_per_s", "peak_rss_mb", "command_seconds")}
           for k, v in runs.items()}
    sft = med["sft"]["examples_per_s"]
    precision = sorted({r["precision"] for v in runs.values() for r in v if r.get("precision")})
    print(f"\nminilm-l6, SST-2 first {args.rows} rows x 1 epoch, batch 32, max_length 128, precision "
          f"{'/'.join(precision)}; medians of {args.runs} interleaved runs\n")
    print("| technique | examples/s (loop) | step cost vs SFT | goal | peak RSS MB | whole command s |\n"
          "|---|---:|---:|---|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['examples_per_s']:.1f} | {sft / m['examples_per_s']:.2f}x | {GOALS.get(name, '')} | "
              f"{m['peak_rss_mb']:.0f} | {m['command_seconds']:.1f} |")
    rate = statistics.median(labelling)
    print(f"| self-train pseudo-labelling pass | {rate:.1f} rows/s | {sft / rate:.2f}x (forward only) | "
          f"| | |")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "runs": runs, "medians": med,
                                         "pseudo_label_rows_per_s": labelling}, indent=2))


if __name__ == "__main__":
    main()

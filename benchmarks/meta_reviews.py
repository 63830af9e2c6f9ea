"""Issue 20's measurement: leave-one-domain-out meta-learning on the five review domains.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/meta_reviews.py [--held-out airline,books,dvd,electronics,kitchen]
        [--k 4,8,16] [--seeds 0,1,2,3,4] [--starts pretrained,sft,reptile,fomaml] [--outer-steps 100]
        [--out runs/meta-reviews] [--results benchmarks/results/meta_reviews.json] [--table-only]
        [--meta meta.inner_lr=5e-2 ...]

For each held-out domain D: meta-train on the other four (`meta:` on a task: multitask config, one task per domain;
Reptile and first-order MAML, --outer-steps outer steps of 4 episodes, K=8 support rows per class, 5 inner SGD
steps), train a multi-domain SFT run on the four domains' rows pooled (one head, one epoch), then judge every start
with `sftlab adapt START --data reviews/D/train.jsonl --dev reviews/D/dev.jsonl --k-shot K` (50 steps, lr 1e-4,
the same for every start): pretrained minilm-l6, the SFT run, Reptile, FOMAML. max_length 128 throughout (the
domain-adaptation benchmark's). Prints the table (mean over seeds per domain, then the mean over domains) and the
wall time of each meta-training; `--results` keeps every figure across sessions (runs/ is scratch).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["airline", "books", "dvd", "electronics", "kitchen"]
COMMON = ["data.max_length=128", "train.progress=false"]
META = {"meta.k_shot": "8", "meta.query": "8", "meta.inner_steps": "5", "meta.inner_lr": "5e-3",
        "meta.tasks_per_step": "4"}  # --meta overrides these


def sftlab(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "sftlab", *args], cwd=REPO, check=True, stdout=subprocess.PIPE,
                          text=True)
    return proc.stdout.strip().splitlines()[-1]


def meta_start(algorithm: str, held: str, steps: int, out: Path, meta: dict[str, str],
               tag: str) -> tuple[Path, float]:
    run = out / f"{algorithm}-without-{held}{tag.replace('meta.', '-').replace(' ', '')}"
    if not (run / "summary.json").is_file():
        tasks = [f"tasks.{d}.train=reviews/{d}/train.jsonl" for d in DOMAINS if d != held]
        resume = [f"--resume={run}"] if (run / "config.yaml").is_file() else [f"output_dir={run}"]
        settings = sorted(f"{k}={v}" for k, v in meta.items())
        sftlab(["train", "-", "task=multitask", *tasks, *settings, f"meta.algorithm={algorithm}",
                f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 4)}", *COMMON, *resume])
    return run, json.loads((run / "summary.json").read_text())["train_seconds"]


def sft_start(held: str, out: Path) -> tuple[Path, float]:
    run = out / f"sft-without-{held}"
    if not (run / "summary.json").is_file():
        pooled = out / f"pooled-without-{held}.jsonl"  # the four domains' training rows in one file (scratch)
        if not pooled.is_file():
            data = Path(os.environ["SFTLAB_DATA_DIR"])
            pooled.write_text("".join((data / "reviews" / d / "train.jsonl").read_text(encoding="utf-8")
                                      for d in DOMAINS if d != held), encoding="utf-8")
        resume = [f"--resume={run}"] if (run / "config.yaml").is_file() else [f"output_dir={run}"]
        sftlab(["train", "-", f"data.train={pooled.resolve()}", "data.dev=null", "train.epochs=1",
                "train.eval_every=1000000", *COMMON, *resume])
    return run, json.loads((run / "summary.json").read_text())["train_seconds"]


def suffix(start: str, tag: str) -> str:
    """Overrides of the meta settings change only the meta-learned starts' runs and figures."""
    return f" {tag}" if tag and start in ("reptile", "fomaml") else ""


def figure_key(start: str, held: str, k: int, steps: int, tag: str) -> str:
    return f"{start} held={held} k={k} steps={steps if start in ('reptile', 'fomaml') else 0}{suffix(start, tag)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--held-out", default=",".join(DOMAINS))
    ap.add_argument("--k", default="4,8,16")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--starts", default="pretrained,sft,reptile,fomaml")
    ap.add_argument("--outer-steps", type=int, default=100)
    ap.add_argument("--out", default="runs/meta-reviews")
    ap.add_argument("--results", help="JSON file of every figure, read and extended (kept across sessions)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--meta", nargs="*", default=[], metavar="meta.KEY=VALUE",
                    help="override the meta-training settings above (e.g. meta.inner_lr=5e-2); the runs and figures "
                         "of an override are kept apart from the defaults'")
    args = ap.parse_args()
    meta, changed = dict(META), {}
    for item in args.meta:
        k, sep, v = item.partition("=")
        if not (k.startswith("meta.") and sep and v):
            sys.exit(f"--meta {item!r}: give meta.KEY=VALUE, e.g. meta.inner_lr=5e-2")
        meta[k] = changed[k] = v
    tag = " ".join(f"{k}={v}" for k, v in sorted(changed.items()) if META.get(k) != v)
    if not os.environ.get("SFTLAB_DATA_DIR"):
        sys.exit("set SFTLAB_DATA_DIR to the folder holding reviews/ (e.g. ../shared/data)")
    held_out, ks, starts = args.held_out.split(","), [int(k) for k in args.k.split(",")], args.starts.split(",")
    results = Path(args.results) if args.results else None
    known = json.loads(results.read_text()) if results and results.is_file() else {}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def save(key: str, value) -> None:
        known[key] = value
        if results:  # two benchmark processes may share the file: read-merge-write under a lock
            with open(results.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = {**(json.loads(results.read_text()) if results.is_file() else {}), key: value}
                tmp = results.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, results)

    for held in [] if args.table_only else held_out:
        for start in starts:
            if start == "pretrained":
                where, seconds = "minilm-l6", None
            elif start == "sft":
                where, seconds = sft_start(held, out)
            else:
                where, seconds = meta_start(start, held, args.outer_steps, out, meta, tag)
            if seconds is not None:
                save(f"{start} without={held} train_seconds{suffix(start, tag)}", seconds)
            path_tag = suffix(start, tag).replace(" meta.", "-")
            for k in ks:
                key = figure_key(start, held, k, args.outer_steps, tag)
                if key in known:
                    continue
                print(key, file=sys.stderr, flush=True)
                adapt_out = out / "adapt" / f"{start}-{held}-k{k}{path_tag}"
                line = sftlab(["adapt", str(where), "--data", f"reviews/{held}/train.jsonl", "--dev",
                               f"reviews/{held}/dev.jsonl", "--k-shot", str(k), "--seeds", args.seeds,
                               "--out", str(adapt_out),
                               "--resume", *COMMON])
                save(key, json.loads(line))
                for ckpt in adapt_out.glob("*/checkpoints"):
                    shutil.rmtree(ckpt)  # ~0.6 GB per seed, never read again (the figures are in adapt.json)
    print("| start | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---:|" * len(ks))
    for start in starts:
        cells = []
        for k in ks:
            per = [known[key] for h in held_out if (key := figure_key(start, h, k, args.outer_steps, tag)) in known]
            cells.append(f"{statistics.mean(v['mean'] for v in per):.4f} ({len(per)} domains)" if per else "")
        print(f"| {start} | " + " | ".join(cells) + " |")
    print(json.dumps(known))


if __name__ == "__main__":
    main()

"""Domain adaptation on the multi-domain reviews (issue 17): source -> target pairs, target dev accuracy per method.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/domain_adaptation.py [--pairs books:kitchen,dvd:electronics]
        [--methods source,mlm,mmd,dann,udalm,mlm+mmd,mmd+self_train,ceiling] [--far] [--out runs/da] [--max-length 256]
        [key=value ...]            e.g. model.pooling=mean

Default pairs: the 12 ordered pairs of books, dvd, electronics, kitchen (`--far` adds each -> airline). Methods:
  source   minilm-l6 fine-tuned on the source's labels (source dev chooses the best checkpoint)
  mlm      masked-LM continued pre-training on the target's train text (configs/adapt/kitchen_mlm.yaml's settings,
           once per target), then `source` from that start
  mmd      `source` + objective mmd with the target's train text as data.unlabelled
  dann     `source` + objective dann, likewise
  udalm    `source` + objective udalm (masked LM on the target rows in the same steps), likewise
  mlm+X    a combination: the `mlm` start, then objective X (mmd, dann or udalm) as above
  self_train  self-training (`sftlab self-train --rounds 1 --threshold 0.9`): source-only labels the target's train
           text, a fresh run trains on the source labels + the confident target rows (class-balanced); Ruder & Plank
           2018 found it a strong baseline on these very review domains
  X+self_train  the same with method X's run (e.g. mmd) as the labeller; X must come earlier in --methods
  ceiling  trained on the target's own labels (what adaptation cannot beat)
The table adds `selected`: per pair, the method with the best *source* dev accuracy (ties: the earlier in
--methods), i.e. what a user without target labels would deploy; its mean is the grid's honest "best method".
Pass `model.pooling=mean` (the grid of record since 2026-12-07): the head then reads the mean of the token states,
the sentence embedding minilm-l6 was trained for, which the MLM start and UDALM train directly; with the default
[CLS] pooler the MLM start moved an untrained [CLS] state and cost 5 points on dvd -> electronics (with the mean:
0.3; on other pairs it still costs 3-5 points; docs/continued-pretraining.md). One --out holds runs of one set of overrides (checked).
Target labels are never used for training or for choosing a checkpoint (the source dev set chooses), only for the
reported accuracy on the target dev set. Every run is a child process (`sftlab train`, `sftlab eval`) into
OUT/<method>/<source>-<target> (source-only runs into OUT/source/<source>, shared by every target and by the ceiling
of that domain); finished runs are reused, so the script resumes where it stopped. `--results FILE` also keeps
every scored figure in a JSON file (keyed by method, pair, max_length and overrides, with the precision the run
used), so a later session on a fresh machine skips what is already measured even when OUT is gone. Prints a per-pair
table, the averages and, as the last stdout line, the JSON of every figure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("books", "dvd", "electronics", "kitchen")
SFTLAB = [sys.executable, "-m", "sftlab"]


def data(domain: str, split: str) -> str:
    return f"reviews/{domain}/{split}.jsonl"


def train(out: Path, overrides: list[str]) -> Path:
    if not (out / "summary.json").is_file():
        cmd = [*SFTLAB, "train", "-", *overrides, f"output_dir={out}"]
        if (out / "config.yaml").is_file():
            cmd.append(f"--resume={out}")
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def run_path(out: Path, m: str, src: str, tgt: str) -> Path:
    """Where method m's run of src -> tgt lives: source-only runs are shared by every target of their source, and
    the ceiling is the target's own source-only run."""
    if m == "source":
        return out / "source" / src
    if m == "ceiling":
        return out / "source" / tgt
    if m.endswith("self_train"):  # round 0 is the labeller's run (`self-train --round-0`), round 1 the result
        return out / m / f"{src}-{tgt}" / "round-1"
    return out / m / f"{src}-{tgt}"


def target_accuracy(run: Path, target: str) -> float:
    cache = run / f"target-{target}.json"
    if not cache.is_file():
        proc = subprocess.run([*SFTLAB, "eval", str(run), "--data", data(target, "dev")], cwd=REPO, check=True,
                              capture_output=True, text=True)
        cache.write_text(proc.stdout.strip().splitlines()[-1])
    return json.loads(cache.read_text())["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", help="comma-separated source:target (default: all 12 product pairs)")
    ap.add_argument("--methods", default="source,mlm,mmd,dann,udalm,mlm+mmd,mmd+self_train,ceiling")
    ap.add_argument("--far", action="store_true", help="also each product domain -> airline")
    ap.add_argument("--out", default="runs/da")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length of every run (MLM start included)")
    ap.add_argument("--results", help="JSON file of scored figures, read and extended (kept across sessions)")
    ap.add_argument("overrides", nargs="*", help="key=value for every classification run, e.g. train.epochs=3")
    args = ap.parse_args()
    if not os.environ.get("SFTLAB_DATA_DIR"):
        sys.exit("set SFTLAB_DATA_DIR to the folder holding reviews/ (e.g. ../shared/data)")
    pairs = ([tuple(p.split(":")) for p in args.pairs.split(",")] if args.pairs
             else list(itertools.permutations(DOMAINS, 2)))
    if args.far:
        pairs += [(s, "airline") for s in DOMAINS]
    methods, out = args.methods.split(","), Path(args.out)
    # runs are reused by folder, so one --out holds one set of overrides (the MLM starts take none: link
    # OUT/mlm-pretrain from another --out to reuse them)
    stamp = out / "overrides.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != args.overrides:
        sys.exit(f"--out {out} holds runs with overrides {json.loads(stamp.read_text())}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(args.overrides))
    base = ["model.name=minilm-l6", "task=classification", "data.text=text", "data.label=label",
            f"data.max_length={args.max_length}", "train.epochs=2", "train.batch_size=32", "train.lr=5e-5",
            "train.eval_every=50", "train.seed=0", "train.progress=false", *args.overrides]
    table: dict[str, dict[str, float]] = {}
    results = Path(args.results) if args.results else None
    known = json.loads(results.read_text()) if results and results.is_file() else {}
    dev: dict[str, dict[str, float]] = {}  # pair -> method -> source dev accuracy (what may choose a method)
    for src, tgt in pairs:
        key, row = f"{src}->{tgt}", {}
        source = base + [f"data.train={data(src, 'train')}", f"data.dev={data(src, 'dev')}"]
        for m in methods:
            rkey = f"{m} {key} max_length={args.max_length} {' '.join(args.overrides)}".strip()
            if rkey in known:
                row[m] = known[rkey]["accuracy"]
                summary = run_path(out, m, src, tgt) / "summary.json"
                if "source_dev" not in known[rkey] and m != "ceiling" and summary.is_file():  # older entries
                    known[rkey]["source_dev"] = json.loads(summary.read_text())["dev_metrics"]["accuracy"]
                if "source_dev" in known[rkey]:
                    dev.setdefault(key, {})[m] = known[rkey]["source_dev"]
                continue
            print(f"{key}: {m}", file=sys.stderr, flush=True)
            run = run_path(out, m, src, tgt)
            if m == "source":   # one run per source domain, scored on every target
                train(run, source)
            elif m.endswith("self_train"):
                labeller = run_path(out, m.rsplit("+", 1)[0] if "+" in m else "source", src, tgt)
                if not (labeller / "summary.json").is_file():
                    sys.exit(f"--methods: {m} labels with {labeller}, which is not trained; list its method first")
                if not (run / "summary.json").is_file():  # the labeller's run is round 0, not trained again
                    subprocess.run([*SFTLAB, "self-train", "-", *source, f"data.unlabelled={data(tgt, 'train')}",
                                    "--rounds", "1", "--threshold", "0.9", "--round-0", str(labeller),
                                    "--out", str(run.parent), "--resume"],
                                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            elif m == "mlm" or m.startswith("mlm+"):
                mlm = train(out / "mlm-pretrain" / tgt, [
                    "model.name=minilm-l6", "task=masked_lm", f"data.train={data(tgt, 'train')}",
                    f"data.dev={data(tgt, 'dev')}", "data.text=text", f"data.max_length={args.max_length}",
                    "train.epochs=3", "train.batch_size=32", "train.lr=2e-4", "train.warmup_ratio=0.06",
                    "train.seed=0", "train.progress=false"])
                start = source + [f"model.name={mlm / 'best'}"]
                if m != "mlm":  # a combination: the target-MLM start, then an adaptation objective
                    start += [f"objective.name={m[4:]}", f"data.unlabelled={data(tgt, 'train')}"]
                train(run, start)
            elif m in ("mmd", "dann", "udalm"):
                train(run, source + [f"objective.name={m}", f"data.unlabelled={data(tgt, 'train')}"])
            elif m == "ceiling":  # the target's own source-only run: same settings, the target's labels
                train(run, base + [f"data.train={data(tgt, 'train')}", f"data.dev={data(tgt, 'dev')}"])
            else:
                sys.exit(f"--methods: unknown method {m!r}; use source, mlm, mmd, dann, udalm, ceiling, mlm+X, "
                         "[X+]self_train")
            row[m] = target_accuracy(run, tgt)
            if results:  # written after every figure: a stopped grid loses at most the run in progress
                summary = json.loads((run / "summary.json").read_text())
                known[rkey] = {"accuracy": row[m], "precision": summary.get("precision")}
                if m != "ceiling":  # the ceiling's dev set is the target's
                    known[rkey]["source_dev"] = dev.setdefault(key, {})[m] = summary["dev_metrics"]["accuracy"]
                results.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        table[key] = row
        print(f"{key}: " + "  ".join(f"{m} {v:.4f}" for m, v in row.items()), file=sys.stderr, flush=True)

    if results and known:  # keeps the source dev figures read back from run folders for older entries
        results.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    # "selected": per pair, the method a user would deploy without target labels - the best source dev accuracy
    # (ties go to the earlier method in --methods, source-only first)
    chosen = {}
    for key in table:
        cands = [m for m in methods if m != "ceiling" and m in dev.get(key, {})]
        if cands and len(cands) == len([m for m in methods if m != "ceiling"]):
            chosen[key] = max(cands, key=lambda m: (dev[key][m], -methods.index(m)))
            table[key]["selected"] = table[key][chosen[key]]
    cols = methods + (["selected"] if len(chosen) == len(table) else [])
    print("| pair | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for key, row in table.items():
        print(f"| {key} | " + " | ".join(f"{row[m]:.4f}" + (f" ({chosen[key]})" if m == "selected" else "")
                                           for m in cols) + " |")
    means = {m: statistics.mean(row[m] for row in table.values()) for m in cols}
    print("| **mean** | " + " | ".join(f"**{means[m]:.4f}**" for m in cols) + " |")
    if "source" in methods:
        print("gain over source-only (points): " + ", ".join(
            f"{m} {100 * (means[m] - means['source']):+.2f}" for m in cols if m != "source"))
    print(json.dumps({"pairs": table, "mean": means}))


if __name__ == "__main__":
    main()

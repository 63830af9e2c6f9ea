"""sftlab `task: masked_lm` vs the HF Trainer with DataCollatorForLanguageModeling: same text, model, batch.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/mlm_throughput.py [--domains books,dvd,electronics,kitchen]
        [--runs 1] [--max-length 256] [--threads N]

Work on both sides: minilm-l6 with an MLM head, the reviews' train text of the given domains (labels ignored),
max_length 256 (longer texts cut), 1 epoch, batch 32, lr 5e-5, weight decay 0.01, 6% warmup, 15% masking with
80/10/10, seed 0, no evaluation, no saving beyond what each tool does by default at the end. The HF side runs its
best settings: dynamic padding in the collator, `group_by_length`, and bf16 autocast or fp32, whichever the
sftlab side's `precision: auto` picked on this CPU (so both compute in the same precision). Each side is a child
process; examples/s are each tool's own training-loop figures. Prints the table and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = dict(epochs=1, batch_size=32, lr=5e-5, weight_decay=0.01, warmup_ratio=0.06, seed=0)


def texts(data_dir: Path, domains: list[str]) -> list[str]:
    out = []
    for d in domains:
        out += [json.loads(x)["text"] for x in (data_dir / "reviews" / d / "train.jsonl").read_text().splitlines()]
    return out


def hf_worker(args) -> None:
    from datasets import Dataset
    from transformers import (AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments, set_seed)

    from sftlab.models import resolve_model

    path = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts(args.data_dir, args.domains.split(",")), truncation=True, max_length=args.max_length)
    ds = Dataset.from_dict(dict(enc))
    set_seed(WORK["seed"])
    model = AutoModelForMaskedLM.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, num_train_epochs=WORK["epochs"], per_device_train_batch_size=WORK["batch_size"],
            learning_rate=WORK["lr"], weight_decay=WORK["weight_decay"], warmup_steps=WORK["warmup_ratio"],
            seed=WORK["seed"], bf16=args.bf16, use_cpu=True, train_sampling_strategy="group_by_length",
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, processing_class=tok,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=0.15))
        metrics = trainer.train().metrics
    args._out.write_text(json.dumps({"examples_per_s": metrics["train_samples_per_second"],
                                     "train_seconds": metrics["train_runtime"], "rows": len(ds)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", default="books,dvd,electronics,kitchen")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SFTLAB_DATA_DIR", REPO.parent / "shared" / "data")))
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    if args._worker:
        return hf_worker(args)
    threads = str(args.threads or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "SFTLAB_DATA_DIR": str(args.data_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    rows, runs = len(texts(args.data_dir, args.domains.split(","))), []
    with tempfile.TemporaryDirectory(prefix="sftlab-mlm-") as tmp:
        for i in range(args.runs):  # interleaved: drift in machine speed hits both sides alike
            files = [str(args.data_dir / "reviews" / d / "train.jsonl") for d in args.domains.split(",")]
            joined = Path(tmp) / "text.jsonl"
            joined.write_text("".join(Path(f).read_text() for f in files))
            cmd = [sys.executable, "-m", "sftlab", "train", "-", "model.name=minilm-l6", "task=masked_lm",
                   f"data.train={joined}", f"data.max_length={args.max_length}", f"train.epochs={WORK['epochs']}",
                   f"train.batch_size={WORK['batch_size']}", f"train.lr={WORK['lr']}",
                   f"train.weight_decay={WORK['weight_decay']}", f"train.warmup_ratio={WORK['warmup_ratio']}",
                   f"train.seed={WORK['seed']}", "train.progress=false", f"output_dir={Path(tmp) / f'run-{i}'}"]
            rc, out, rss = run_child(cmd, env, capture=True)
            if rc != 0:
                sys.exit(f"sftlab failed (exit {rc})")
            s = json.loads((Path(out.strip().splitlines()[-1]) / "summary.json").read_text())
            runs.append({"tool": "sftlab", "examples_per_s": s["train_examples_per_s"],
                         "train_seconds": s["train_seconds"], "peak_rss_mb": rss, "precision": s["precision"]})
            hf_out = Path(tmp) / f"hf-{i}.json"
            cmd = [sys.executable, __file__, "--_worker", "--_out", str(hf_out), "--domains", args.domains,
                   "--max-length", str(args.max_length), "--data-dir", str(args.data_dir)]
            rc, _, rss = run_child(cmd + (["--bf16"] if s["precision"] == "bf16" else []), env, capture=False)
            if rc != 0:
                sys.exit(f"HF worker failed (exit {rc})")
            runs.append({"tool": "hf", **json.loads(hf_out.read_text()), "peak_rss_mb": rss,
                         "precision": s["precision"]})
    print(f"\nminilm-l6 masked LM, {rows} review texts ({args.domains}) x 1 epoch, max_length {args.max_length}, "
          f"batch 32, {threads} threads\n")
    print("| tool | run | precision | examples/s | train s | peak RSS MB |\n|---|---:|---|---:|---:|---:|")
    for k, r in enumerate(runs):
        print(f"| {r['tool']} | {k // 2} | {r['precision']} | {r['examples_per_s']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")
    import statistics

    med = {t: statistics.median(r["examples_per_s"] for r in runs if r["tool"] == t) for t in ("sftlab", "hf")}
    print(f"\nsftlab / HF Trainer examples/s (medians): **{med['sftlab'] / med['hf']:.2f}x**")
    print(json.dumps({"runs": runs, "ratio": med["sftlab"] / med["hf"]}))


if __name__ == "__main__":
    main()

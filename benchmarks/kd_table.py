"""The distillation table of issue 16: dev metric, parameters and CPU examples/s at batch 1 and 32 per model.

    python benchmarks/kd_table.py --data glue/sst2/dev.tsv teacher=RUN no_kd=RUN distilled=RUN [--rounds 3]

Each NAME=RUN is a run directory or an export folder. The metric is `sftlab eval`'s on the full --data file;
speed is `sftlab predict`'s path (load_exported, fp32, this machine's threads): batch 1 over the first --rows rows,
batch 32 over all rows, rounds interleaved across models (noise hits every model alike), medians quoted. Prints a
markdown table and a JSON line (last) with every figure and the ratios against the first model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def speed(exported, texts, pairs, batch: int) -> float:
    exported.batch_size = batch
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        exported.logits(texts[i:i + batch], pairs[i:i + batch] if pairs else None)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=RUN_DIR|EXPORT_DIR")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=200, help="rows timed at batch 1")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from sftlab.config import DataConfig  # noqa: F401  (imports the package's registries)
    from sftlab.data.examples import load_split
    from sftlab.eval.evaluate import evaluate_file, run_dir_of
    from sftlab.export.predict import evaluate_export
    from sftlab.export.runtime import load_exported, read_export_meta

    named = dict(m.split("=", 1) for m in args.models)
    rows, loaded = {}, {}
    for name, path in named.items():
        print(f"evaluating {name} ({path})", file=sys.stderr)
        if read_export_meta(path) is not None:
            scores = evaluate_export(path, args.data)
        else:
            scores = evaluate_file(path, args.data, analysis=False)
        loaded[name] = load_exported(path)
        model = loaded[name].model
        rows[name] = {"path": path, **{k: v for k, v in scores.items() if isinstance(v, (int, float))},
                      "params": sum(p.numel() for p in model.parameters()),
                      "layers": getattr(model.config, "num_hidden_layers", None)}
        if run_dir_of(path) is not None:
            try:
                summary = json.loads((run_dir_of(path) / "summary.json").read_text())
                rows[name]["train_examples_per_s"] = summary["train_examples_per_s"]
                rows[name]["train_examples"] = summary["examples"]
            except (OSError, KeyError, ValueError):
                pass
    from sftlab.config import load_config

    run_dirs = [run_dir_of(p) for p in named.values() if run_dir_of(p) is not None]
    if not run_dirs:
        sys.exit("kd_table: name at least one run directory (its config says which column holds the text)")
    cfg = load_config(str(run_dirs[0] / "config.yaml"), [])
    # the file resolves as `sftlab eval` resolves it: as given or under SFTLAB_DATA_DIR, not the run's data.dir
    split, _ = load_split(cfg.data.model_copy(update={"dir": None}), args.data, cfg.task, None, need_label=False)
    texts = [e.text for e in split.examples]
    pairs = [e.text_pair for e in split.examples] if split.examples[0].text_pair else None
    timings: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in named}
    with torch.inference_mode():
        for name in named:  # warm-up
            speed(loaded[name], texts[:32], pairs[:32] if pairs else None, 32)
        for r in range(args.rounds):
            for name in named:
                timings[name][1].append(speed(loaded[name], texts[:args.rows], pairs, 1))
                timings[name][32].append(speed(loaded[name], texts, pairs, 32))
            print(f"round {r + 1}/{args.rounds} timed", file=sys.stderr)
    first = next(iter(named))
    for name in named:
        rows[name]["examples_per_s_batch1"] = statistics.median(timings[name][1])
        rows[name]["examples_per_s_batch32"] = statistics.median(timings[name][32])
    for name in named:
        for b in (1, 32):
            rows[name][f"speedup_vs_{first}_batch{b}"] = (rows[name][f"examples_per_s_batch{b}"]
                                                         / rows[first][f"examples_per_s_batch{b}"])
    metric = next(m for m in ("accuracy", "pearson") if m in rows[first])
    print(f"| model | dev {metric} | parameters | layers | ex/s batch 1 | ex/s batch 32 | x {first} (b1 / b32) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r[metric]:.4f} | {r['params'] / 1e6:.1f}M | {r['layers']} | "
              f"{r['examples_per_s_batch1']:.1f} | {r['examples_per_s_batch32']:.1f} | "
              f"{r[f'speedup_vs_{first}_batch1']:.2f} / {r[f'speedup_vs_{first}_batch32']:.2f} |")
    print(json.dumps({"threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()

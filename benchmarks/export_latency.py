"""Latency of `sftlab export` folders side by side, timed interleaved so a busy machine hurts every side alike.

    python benchmarks/export_latency.py DIR [DIR ...] --data dev.tsv [--threads 1,2] [--rounds 5] [--text sentence]

Each DIR is an export folder (hf / merged / onnx / int8) or a run directory, loaded with
`sftlab.export.runtime.load_exported`. Per thread count and round, every side runs batch 1 (a median-length
input, 20 calls) then batch 32 (the first 32 rows, 3 calls), one side after another; the table holds the median
over all calls, plus the folder size, accuracy on --data and the max |logit difference| to the first DIR.
Progress to stderr, the markdown table to stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def read_rows(path: str, text: str, label: str) -> tuple[list[str], np.ndarray]:
    import csv

    sep = "\t" if path.endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=sep, quoting=csv.QUOTE_NONE))
    return [r[text] for r in rows], np.array([int(r[label]) for r in rows])


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--text", default="sentence")
    p.add_argument("--label", default="label")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)

    import torch

    from sftlab.export.runtime import load_exported

    texts, y = read_rows(a.data, a.text, a.label)
    one = [sorted(texts, key=len)[len(texts) // 2]]
    batch = texts[:32]
    print("| threads | model | size MB | batch 1 ms | batch 32 ms | accuracy | vs first | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        sides = {d: load_exported(d, threads=threads) for d in a.dirs}
        times = {d: {1: [], 32: []} for d in a.dirs}
        for r in range(a.rounds):
            print(f"threads {threads} round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            for d, m in sides.items():
                for b, inputs, calls in ((1, one, 20), (32, batch, 3)):
                    m.logits(inputs)  # warm
                    for _ in range(calls):
                        t = time.perf_counter()
                        m.logits(inputs)
                        times[d][b].append(1000 * (time.perf_counter() - t))
        logits = {d: m.logits(texts) for d, m in sides.items()}
        ref = logits[a.dirs[0]]
        acc0 = float((ref.argmax(1) == y).mean())
        for d in a.dirs:
            acc = float((logits[d].argmax(1) == y).mean())
            name = f"{Path(d).name} ({sides[d].format})"
            print(f"| {threads} | {name} | {size_mb(Path(d)):.1f} | {statistics.median(times[d][1]):.2f} | "
                  f"{statistics.median(times[d][32]):.1f} | {acc:.4f} | {acc - acc0:+.4f} | "
                  f"{float(np.abs(logits[d] - ref).max()):.2g} |", flush=True)


if __name__ == "__main__":
    main()

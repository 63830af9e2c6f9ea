"""`sftlab compare`: the same config, data and seed under several strategies, one table.

A sweep over strategy.name (sweep.py runs it: one child process per strategy, so peak memory is that run's own and
one strategy's failure does not take the others down), with per-strategy extras (`--set`) and a table of the costs
that tell strategies apart. Run directories stay under OUT/<strategy>/; OUT/compare.json and OUT/compare.md hold
the table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError
from .sweep import run_jobs


def parse_sets(sets: list[str], names: list[str]) -> dict[str, list[str]]:
    """`--set lora:train.lr=5e-4` -> {"lora": ["train.lr=5e-4"]}."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in sets:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--set {item}: expected STRATEGY:key=value, e.g. --set lora:train.lr=5e-4")
        if name not in out:
            raise ConfigError(f"--set {item}: {name} is not in --strategies ({', '.join(names)})")
        out[name].append(override)
    return out


def compare(config: str | None, strategies: list[str], overrides: list[str], sets: list[str], out: Path,
            resume: bool = False, workers: int = 1) -> list[dict]:
    per = parse_sets(sets, strategies)
    jobs = {name: [f"strategy.name={name}", *per[name]] for name in strategies}
    return run_jobs(config, jobs, overrides, out, resume, workers, on_rows=lambda rows: _write(out, rows))


def _write(out: Path, rows: list[dict]) -> None:
    rows = [{"strategy": r["name"], **{k: v for k, v in r.items() if k != "name"}} for r in rows]
    tmp = out / ".compare.json.tmp"
    tmp.write_text(json.dumps({"rows": rows}, indent=2))
    os.replace(tmp, out / "compare.json")
    (out / "compare.md").write_text(markdown(rows) + "\n")


def markdown(rows: list[dict]) -> str:
    rows = [{"strategy": r.get("strategy", r.get("name")), **r} for r in rows]
    metric = next((r["metric_name"] for r in rows if "metric_name" in r), "metric")
    full = next((r for r in rows if r.get("strategy") == "full" and "error" not in r), None)
    head = (f"| strategy | dev {metric} | trainable params | trainable % | train s | examples/s | peak RSS MB "
            "| checkpoint MB |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | failed: {r['error']} | | | | | | |")
            continue
        m = "n/a" if r["metric"] is None else f"{r['metric']:.4f}"
        ckpt = f"{r['checkpoint_mb']:.2f}"
        if full and full["checkpoint_mb"]:
            ckpt += f" ({100 * r['checkpoint_mb'] / full['checkpoint_mb']:.1f}%)"
        lines.append(f"| {r['strategy']} | {m} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['train_s']:.1f} "
                     f"| {r['examples_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {ckpt} |")
    return "\n".join(lines)

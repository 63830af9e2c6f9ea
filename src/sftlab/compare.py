"""`sftlab compare`: the same config, data and seed under several strategies, one table.

Each strategy trains in its own child process (`sftlab train`), so peak memory is that run's own (wait4's
ru_maxrss) and one strategy's failure does not take the others down. Run directories stay under
OUT/<strategy>/ for inspection; OUT/compare.json and OUT/compare.md hold the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import dump_config, load_config
from .errors import ConfigError, RunDirError



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


def weights_mb(folder: Path) -> float:
    """Size of the saved weights in RUN_DIR/best (safetensors files): what a user ships."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def run_one(config: str | None, overrides: list[str], run_dir: Path, resume: bool) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "sftlab", "train", config or "-", *overrides]
    cmd += ["--resume", str(run_dir)] if resume else [f"output_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)  # the child's report and bar go to our stderr
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def row_of(name: str, run_dir: Path, peak_mb: float | None) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    metric = s["best_metric"]
    return {
        "strategy": name, "metric": (s.get("dev_metrics") or {}).get(metric), "metric_name": metric,
        "trainable": s["trainable_params"], "trainable_pct": 100 * s["trainable_params"] / s["total_params"],
        "train_s": s["train_seconds"], "examples_per_s": s["train_examples_per_s"],
        "peak_rss_mb": peak_mb if peak_mb is not None else s["peak_rss_mb"],
        "checkpoint_mb": weights_mb(run_dir / "best"), "run_dir": str(run_dir),
    }


def compare(config: str | None, strategies: list[str], overrides: list[str], sets: list[str], out: Path,
            resume: bool = False) -> list[dict]:
    per = parse_sets(sets, strategies)
    # Validate every variant before hours of training: a typo fails now, with the key named.
    # A base config's lora options are not a mistake when the variant is full: each variant drops the options its
    # strategy does not read, and its child trains that resolved config (OUT/variants/NAME.yaml).
    variants = {name: dump_config(load_config(config, overrides + [f"strategy.name={name}"] + per[name],
                                              foreign_options=True)) for name in strategies}
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunDirError(f"--out {out} exists and is not empty; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants").mkdir(exist_ok=True)
    for name, text in variants.items():
        (out / "variants" / f"{name}.yaml").write_text(text, encoding="utf-8")
    rows = []
    for i, name in enumerate(strategies, 1):
        run_dir = out / name
        print(f"[{i}/{len(strategies)}] {name} -> {run_dir}", file=sys.stderr, flush=True)
        if (run_dir / "summary.json").is_file():
            rows.append(row_of(name, run_dir, _saved_peak(out, name)))
            print(f"  already finished; reusing {run_dir}/summary.json", file=sys.stderr)
            continue
        t0 = time.time()
        code, peak = run_one(str(out / "variants" / f"{name}.yaml"), [], run_dir,
                             resume and (run_dir / "config.yaml").is_file())
        if code != 0:
            rows.append({"strategy": name, "error": f"exit {code} after {time.time() - t0:.0f}s", "run_dir": str(run_dir)})
        else:
            rows.append(row_of(name, run_dir, peak))
        _write(out, rows)
    _write(out, rows)
    return rows


def _saved_peak(out: Path, name: str) -> float | None:
    f = out / "compare.json"
    if f.is_file():
        for r in json.loads(f.read_text()).get("rows", []):
            if r.get("strategy") == name and "peak_rss_mb" in r:
                return r["peak_rss_mb"]
    return None


def _write(out: Path, rows: list[dict]) -> None:
    tmp = out / ".compare.json.tmp"
    tmp.write_text(json.dumps({"rows": rows}, indent=2))
    os.replace(tmp, out / "compare.json")
    (out / "compare.md").write_text(markdown(rows) + "\n")


def markdown(rows: list[dict]) -> str:
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

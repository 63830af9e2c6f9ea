"""`sftlab sweep CONFIG --over KEY=V1,V2 [--over ...]`: every combination trained once, a table of mean +- std.

The runner under `sftlab compare` too (compare is a sweep over strategy.name with per-strategy extras). Each run is
a child `sftlab train` (its peak RSS is its own, from wait4; one failure does not stop the others), into
OUT/<combination>/, validated before anything trains (a typo in the 40th combination fails in the first second).
Finished runs are reused and interrupted ones resumed with --resume, so a sweep over seeds survives a stopped
session. Keys ending in `seed` (train.seed, data.k_shot_seed) are repeats, not settings: the table has one row per
setting of the other keys, with the mean and the sample standard deviation (n - 1, as LM-BFF and SetFit report
their 5-seed figures) over the repeats.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .config import dump_config, load_config
from .errors import ConfigError, RunDirError


def parse_over(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--over data.k_shot=8,16` -> [("data.k_shot", ["8", "16"])], in the order given."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f"--over {item}: expected KEY=V1,V2,..., e.g. --over data.k_shot_seed=0,1,2,3,4")
        if key in (k for k, _ in out):
            raise ConfigError(f"--over {key} is given twice; list all its values in one --over")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--over {item}: a value is listed twice")
        out.append((key, vals))
    return out


def job_name(combo: dict[str, str]) -> str:
    """One key: its value (compare's OUT/lora). Several: short keys joined, e.g. k_shot=8,k_shot_seed=0."""
    if len(combo) == 1:
        return next(iter(combo.values()))
    leaves = [k.rsplit(".", 1)[-1] for k in combo]
    keys = leaves if len(set(leaves)) == len(leaves) else list(combo)
    return ",".join(f"{k}={v}" for k, v in zip(keys, combo.values()))


def weights_mb(folder: Path) -> float:
    """Size of the saved weights in RUN_DIR/best (safetensors files): what a user ships."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def row_of(name: str, run_dir: Path, peak_mb: float | None) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    metric = s["best_metric"]
    return {
        "name": name, "metric": (s.get("dev_metrics") or {}).get(metric), "metric_name": metric,
        "trainable": s["trainable_params"], "trainable_pct": 100 * s["trainable_params"] / s["total_params"],
        "train_s": s["train_seconds"], "examples_per_s": s["train_examples_per_s"],
        "peak_rss_mb": peak_mb if peak_mb is not None else s["peak_rss_mb"],
        "checkpoint_mb": weights_mb(run_dir / "best"), "run_dir": str(run_dir),
    }


def run_jobs(config: str | None, jobs: dict[str, list[str]], overrides: list[str], out: Path, resume: bool,
             workers: int = 1, on_rows=None) -> list[dict]:
    """Train each job (name -> its overrides) in a child process, `workers` at a time; rows in job order."""
    # Validate every variant first. A base config's lora options are not a mistake when a variant is full: each
    # drops the options its strategy does not read, and its child trains that resolved config (OUT/variants/).
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunDirError(f"--out {out} exists and is not empty; continue it with --resume or choose another --out")
    write_variants(config, jobs, overrides, out)
    env = dict(os.environ)
    if workers > 1 and "OMP_NUM_THREADS" not in env:  # share the cores, not oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    done: dict[str, dict] = {}
    pending = list(jobs)
    running: dict[int, tuple[str, subprocess.Popen, float]] = {}
    total = len(jobs)
    while pending or running:
        while pending and len(running) < workers:
            name = pending.pop(0)
            run_dir = out / name
            print(f"[{total - len(pending)}/{total}] {name} -> {run_dir}", file=sys.stderr, flush=True)
            if (run_dir / "summary.json").is_file():
                print(f"  already finished; reusing {run_dir}/summary.json", file=sys.stderr)
                done[name] = row_of(name, run_dir, _saved_peak(out, name))
                continue
            cmd = [sys.executable, "-m", "sftlab", "train", str(out / "variants" / f"{name}.yaml")]
            cmd += ["--resume", str(run_dir)] if resume and (run_dir / "config.yaml").is_file() \
                else [f"output_dir={run_dir}"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)  # the child's report goes to stderr
            running[proc.pid] = (name, proc, time.time())
        if not running:
            continue
        finished = _wait_any(running)
        if finished is None:
            continue
        pid, status, usage = finished
        name, proc, t0 = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        done[name] = (row_of(name, out / name, usage.ru_maxrss / 1024) if code == 0 else
                      {"name": name, "error": f"exit {code} after {time.time() - t0:.0f}s", "run_dir": str(out / name)})
        if on_rows:
            on_rows([done[n] for n in jobs if n in done])
    rows = [done[n] for n in jobs]
    if on_rows:
        on_rows(rows)
    return rows


def write_variants(config: str | None, jobs: dict[str, list[str]], overrides: list[str], out: Path) -> None:
    """OUT/variants/<job>.yaml, each job's resolved config, all validated before anything trains. A base config's
    lora options are not a mistake when a variant is full: each drops the options its strategy does not read."""
    variants = {name: dump_config(load_config(config, overrides + extra, foreign_options=True))
                for name, extra in jobs.items()}
    (out / "variants").mkdir(parents=True, exist_ok=True)
    for name, text in variants.items():  # atomic: workers sharing OUT write the same files at once
        tmp = out / "variants" / f".{name}.yaml.{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / "variants" / f"{name}.yaml")


def _wait_any(running: dict) -> tuple | None:
    """The first of our children to end (pid, status, rusage), polling: wait4(-1) could reap a process that is not
    ours (a server a test started, say) and leave its owner without an exit status."""
    if len(running) == 1:
        return os.wait4(next(iter(running)), 0)
    for pid in running:
        got = os.wait4(pid, os.WNOHANG)
        if got[0]:
            return got
    time.sleep(0.5)
    return None


def _saved_peak(out: Path, name: str) -> float | None:
    for f in (out / "sweep.json", out / "compare.json"):
        if f.is_file():
            for r in json.loads(f.read_text()).get("rows", []):
                if r.get("name", r.get("strategy")) == name and "peak_rss_mb" in r:
                    return r["peak_rss_mb"]
    return None


def sweep(config: str | None, over: list[str], overrides: list[str], out: Path, resume: bool = False,
          workers: int = 1, mean_over: list[str] | None = None, storage: str | None = None,
          study_name: str | None = None, heartbeat: int = 20) -> dict:
    overs = parse_over(over)
    keys = [k for k, _ in overs]
    repeats = mean_over if mean_over is not None else [k for k in keys if k.endswith("seed")]
    unknown = [k for k in repeats if k not in keys]
    if unknown:
        raise ConfigError(f"--mean-over {','.join(unknown)}: not an --over key ({', '.join(keys)})")
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(v for _, v in overs))]
    jobs = {job_name(c): [f"{k}={v}" for k, v in c.items()] for c in combos}
    values = {job_name(c): c for c in combos}

    def write(rows: list[dict]) -> None:
        table = summarise(rows, values, repeats)
        tmp = out / ".sweep.json.tmp"
        tmp.write_text(json.dumps({"over": dict(overs), "mean_over": repeats, "rows": rows, "settings": table},
                                  indent=2))
        os.replace(tmp, out / "sweep.json")
        (out / "sweep.md").write_text(markdown(table, [k for k in keys if k not in repeats]) + "\n")

    if storage:  # shared by workers anywhere (sweep_shared.py); OUT on a filesystem they all see
        from .sweep_shared import run_shared

        if workers > 1:
            raise ConfigError("--workers with --storage: start one worker command per process instead (each trains "
                              "one combination at a time); they share the grid through the study")
        write_variants(config, jobs, overrides, out)
        env = dict(os.environ)
        got = run_shared(list(jobs), out, storage, study_name or out.name, heartbeat, env)
        rows = [got[n] for n in jobs]
        write(rows)
    else:
        rows = run_jobs(config, jobs, overrides, out, resume, workers, on_rows=write)
    return {"rows": rows, "settings": summarise(rows, values, repeats), "keys": [k for k in keys if k not in repeats]}


def summarise(rows: list[dict], values: dict[str, dict], repeats: list[str]) -> list[dict]:
    """One entry per setting of the non-repeat keys: its runs' metric mean, sample std, min, max; failures counted."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        setting = tuple((k, v) for k, v in values[r["name"]].items() if k not in repeats)
        groups.setdefault(setting, []).append(r)
    out = []
    for setting, rs in groups.items():
        ok = [r for r in rs if "error" not in r and r["metric"] is not None]
        m = [r["metric"] for r in ok]
        out.append({"setting": dict(setting), "runs": len(ok), "failed": len(rs) - len(ok),
                    "metric_name": ok[0]["metric_name"] if ok else None,
                    "mean": statistics.mean(m) if m else None, "std": statistics.stdev(m) if len(m) > 1 else 0.0,
                    "min": min(m, default=None), "max": max(m, default=None),
                    "train_s": statistics.mean(r["train_s"] for r in ok) if ok else None})
    return out


def markdown(table: list[dict], keys: list[str]) -> str:
    metric = next((t["metric_name"] for t in table if t["metric_name"]), "metric")
    lines = ["| " + " | ".join(keys + ["runs", f"dev {metric} mean ± std", "min", "max", "train s"]) + " |",
             "|" + "---|" * len(keys) + "---:|---:|---:|---:|---:|"]
    for t in table:
        cells = [t["setting"][k] for k in keys]
        runs = f"{t['runs']}" + (f" ({t['failed']} failed)" if t["failed"] else "")
        if t["mean"] is None:
            lines.append("| " + " | ".join(cells + [runs, "failed", "", "", ""]) + " |")
            continue
        lines.append("| " + " | ".join(cells + [runs, f"{t['mean']:.4f} ± {t['std']:.4f}", f"{t['min']:.4f}",
                                               f"{t['max']:.4f}", f"{t['train_s']:.1f}"]) + " |")
    return "\n".join(lines)

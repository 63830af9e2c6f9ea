"""`sftlab adapt START --data FILE --k-shot K`: how far a starting point goes on a new task from K labels per class.

The judge of meta-learning (issue 20), and equally of any other start: a meta-learned run, a multitask run
(with model.head_from=NAME), a multi-domain SFT run or a pretrained model. Each seed fine-tunes a K-per-class sample
of --data (data.k_shot, nested across K) from START for --steps steps at --lr, then scores --dev once at the end
(or, without --dev, the rows of --data outside the sample); nothing is chosen on the dev set. Runs are
`sftlab sweep` jobs (child processes, resumable, --workers). Prints the table and, as the last stdout line, one
JSON object {"metric", "mean", "std", "per_seed"} for the task's primary metric.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .errors import ConfigError, SftlabError


def start_model(start: str) -> str:
    """model.name for START: a run directory's best/ (or the folder itself), else START (a packaged name or an
    HF folder)."""
    p = Path(start)
    for cand in (p / "best", p):
        if (cand / "sftlab.json").is_file() and (cand / "config.json").is_file():
            return str(cand.resolve())
    if (p / "config.json").is_file() or not p.exists():
        return start
    raise ConfigError(f"{start}: not a run directory with a trained model (RUN_DIR/best) nor a model folder; "
                      f"did training finish?")


def adapt(start: str, data: str, *, k_shot: int, seeds: list[int], dev: str | None = None, steps: int = 50,
          lr: float = 1e-4, overrides: list[str] = (), out: Path, resume: bool = False, workers: int = 1) -> dict:
    from .sweep import run_jobs

    if k_shot < 1 or steps < 1 or not lr > 0:
        raise ConfigError(f"--k-shot, --steps and --lr must be positive (got {k_shot}, {steps}, {lr})")
    base = [f"model.name={start_model(start)}", "task=classification", f"data.train={data}",
            f"data.dev={dev or data}", f"data.k_shot={k_shot}", f"train.max_steps={steps}", f"train.lr={lr}",
            f"train.eval_every={steps}", f"train.batch_size={min(16, 2 * k_shot)}", "train.progress=false"]
    jobs = {f"k{k_shot}-seed{s}": [f"data.k_shot_seed={s}"] for s in seeds}
    rows = run_jobs(None, jobs, base + list(overrides), out, resume, workers)
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        raise SftlabError(f"{', '.join(failed)} failed; see the log above and their run directories under {out}")
    values = [r["metric"] for r in rows]
    result = {"metric": rows[0]["metric_name"], "mean": statistics.mean(values),
              "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values,
              "start": start, "k_shot": k_shot, "seeds": list(seeds), "steps": steps, "lr": lr}
    (out / "adapt.json").write_text(json.dumps(result | {"rows": rows}, indent=2))
    return result


def table(result: dict) -> str:
    return "\n".join([f"| start | K | seeds | dev {result['metric']} mean ± std | per seed |", "|---|---:|---:|---:|---|",
                      f"| {result['start']} | {result['k_shot']} | {len(result['seeds'])} | {result['mean']:.4f} ± "
                      f"{result['std']:.4f} | {', '.join(f'{v:.4f}' for v in result['per_seed'])} |"])

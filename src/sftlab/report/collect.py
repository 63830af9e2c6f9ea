"""Read a run directory into one `Run`: everything the report shows, with a one-line note for each missing piece.

The report never trains. The only model work it may do is the dev-set error analysis of a classifier or
regressor (`sftlab eval` with analysis, a few seconds), because the confusion matrix and reliability diagram
need per-example predictions that training does not keep. Decoders are not evaluated here: generation is
slow and needs choices (label words, max tokens) the report cannot guess, so it says which command to run.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..artifacts import TASKS
from ..errors import RunDirError, SftlabError
from ..precision import resolve as resolve_precision
from ..tasks import task_spec


@dataclass
class Analysis:
    stem: str  # analysis/<stem>.json, the data file's stem
    body: dict  # as written by eval/analysis.py `analyse` or eval/gen_eval.py


@dataclass
class Run:
    path: Path
    name: str
    config_text: str
    config: dict
    task: str
    best_metric: str
    summary: dict | None = None
    train: list[dict] = field(default_factory=list)  # metrics.jsonl train records, one per step
    dev: list[dict] = field(default_factory=list)  # metrics.jsonl dev records, one per step
    meta: dict | None = None  # best/sftlab.json
    analyses: list[Analysis] = field(default_factory=list)  # the dev set's first
    baselines: dict | None = None  # baselines.json: {data path: {row name: metrics}}
    notes: list[str] = field(default_factory=list)

    @property
    def dev_data(self) -> str | None:
        return (self.config.get("data") or {}).get("dev")


def find_run_dir(path: str | Path) -> Path:
    """RUN_DIR itself, or RUN_DIR/best given by mistake; anything else is one clear error."""
    p = Path(path)
    for cand in (p, p.parent):
        if (cand / "config.yaml").is_file() and (cand is p or p.name == "best"):
            return cand
    if not p.exists():
        raise RunDirError(f"{path}: no such directory (expected a run directory printed by `sftlab train`)")
    raise RunDirError(f"{path}: not a run directory (no config.yaml); pass the folder `sftlab train` printed")


def run_names(paths: list[Path]) -> list[str]:
    """The directory names; where two collide, enough parent folders to tell them apart."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


def _read_json(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path.name}: unreadable JSON ({e}); left out")
        return None


def _records(path: Path) -> tuple[list[dict], list[dict]]:
    """(train, dev) records. A resumed run re-logs the steps after its last checkpoint, and a running one may
    end in half a line: the last record of each step wins and broken lines are skipped."""
    train, dev = {}, {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            if rec.get("split") == "dev":
                dev[rec["step"]] = rec
            elif "split" not in rec:
                train[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [dev[k] for k in sorted(dev)]


def load_run(path: Path, name: str, evaluate: bool = True) -> Run:
    config_text = (path / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as e:
        raise RunDirError(f"{path}/config.yaml: not valid YAML ({str(e).splitlines()[0]})") from None
    notes: list[str] = []
    summary = _read_json(path / "summary.json", notes)
    task = config.get("task") or "classification"
    metric = (summary or {}).get("best_metric") or (config.get("train") or {}).get("metric") or \
        (task_spec(task).default_metric if task in TASKS else "loss")
    run = Run(path, name, config_text, config, task, metric, summary=summary, notes=notes,
              meta=_read_json(path / "best" / "sftlab.json", notes),
              baselines=_read_json(path / "baselines.json", notes))
    run.train, run.dev = _records(path / "metrics.jsonl")
    if summary is None:
        notes.append("no summary.json: training has not finished (or crashed); figures below are as logged so far")
    if not run.train:
        notes.append("no training records in metrics.jsonl yet")
    if evaluate:
        _ensure_dev_analysis(run)
    run.analyses = _analyses(run)
    if not run.analyses:
        cmd = f"sftlab eval {path} --data {run.dev_data or 'FILE'}"
        notes.append(f"no error analysis (confusion, calibration, worst errors); make one with `{cmd}`")
    return run


def _analyses(run: Run) -> list[Analysis]:
    folder = run.path / "analysis"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    dev_stem = Path(run.dev_data).stem if run.dev_data else None
    files.sort(key=lambda f: f.stem != dev_stem)  # stable: the dev set first, then by name
    out = []
    for f in files:
        body = _read_json(f, run.notes)
        if isinstance(body, dict):
            out.append(Analysis(f.stem, body))
    return out


def _ensure_dev_analysis(run: Run) -> None:
    """Make the dev analysis when missing, or when it is of an older best model (the run went on after it)."""
    dev = run.dev_data
    if run.task == "causal_lm" or not dev:
        return
    existing = _read_json(run.path / "analysis" / f"{Path(dev).stem}.json", [])  # unreadable: made anew
    if run.meta is None:
        if existing is None:
            run.notes.append("no best model (best/sftlab.json), so no error analysis of the dev set")
        return
    data_cfg = config_data(run.config)
    limit = data_cfg.limit_dev if data_cfg else None  # the rows training scored: summary and analysis agree
    if isinstance(existing, dict) and existing.get("step") == run.meta.get("step") and existing.get("limit") == limit:
        return
    from ..data.examples import resolve_path
    from ..eval.evaluate import evaluate_file

    # An absolute path when the file is found: evaluate_file then reads exactly this file whatever it
    # does with data.dir, and the analysis file name (the stem) is the same as for the configured path.
    resolved = Path(resolve_path(data_cfg, dev)) if data_cfg else None
    target = str(resolved.resolve()) if resolved is not None and resolved.is_file() else dev
    bf16 = resolve_precision((run.config.get("train") or {}).get("precision", "auto"))
    why = "" if existing is None else (f" (the saved one is of step {existing.get('step')}, limit "
                                       f"{existing.get('limit')})")
    print(f"report: {run.name}: error analysis of the best model (step {run.meta.get('step')}) on {dev}{why}",
          file=sys.stderr)
    try:
        evaluate_file(str(run.path), target, bf16=bf16, analysis=True, limit=limit)
    except (SftlabError, OSError) as e:
        run.notes.append(f"error analysis of {dev} failed: {e}")


def config_data(config: dict):
    from pydantic import ValidationError

    from ..config import DataConfig

    try:
        return DataConfig(**(config.get("data") or {}))
    except (ValidationError, TypeError):
        return None

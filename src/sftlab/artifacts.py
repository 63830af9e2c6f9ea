"""What a folder on disk is, decided in one place: a run directory, a trained model folder, an export, or neither.

    RUN_DIR/                 config.yaml + best/ (+ checkpoints/, metrics.jsonl, summary.json; train/rundir.py)
    RUN_DIR/best/            a trained model: HF files (or an adapter) + sftlab.json (task, labels, columns, ...)
    EXPORT_DIR/              `sftlab export` output: a format's files + sftlab_export.json (format, task, labels, ...)
    anything else            a base model: an HF folder, a packaged name or a hub id

`ModelDir.open(path)` classifies without reading weights; `.meta` parses the description with one-line errors.
Before this module six places decided it on their own (shared/design/fusion-architecture.md W4): the CLI's
decoder test, eval, generation, serving, the report and export; they now ask here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ExportError, RunDirError

RUN_META = "sftlab.json"
EXPORT_META = "sftlab_export.json"
TASKS = ("classification", "regression", "causal_lm", "masked_lm", "embedding", "multitask")


@dataclass(frozen=True)
class ModelDir:
    kind: Literal["run", "model", "export", "base"]
    path: Path
    """The folder as given (a run directory, its best/, an export folder), or the base model's name."""
    model_dir: Path | None
    """The folder holding the weights and the description: RUN_DIR/best for a run; None for a base model."""
    run_dir: Path | None
    """The run directory that owns it (for RUN_DIR and RUN_DIR/best), else None."""

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        p = Path(path)
        if (p / EXPORT_META).is_file():
            return cls("export", p, p, None)
        try:
            model_dir = find_model_dir(p)
        except RunDirError:
            return cls("base", p, None, None)
        return cls("run" if model_dir != p else "model", p, model_dir, run_dir_of(p))

    @property
    def trained(self) -> bool:
        """A fine-tuned model with an sftlab description (a run, its best/ or a copy of it)."""
        return self.kind in ("run", "model")

    @property
    def meta(self) -> dict | None:
        """The parsed sftlab.json / sftlab_export.json (its task checked); None for a base model."""
        if self.kind == "export":
            return read_export_meta(self.path)
        if self.trained:
            return read_run_meta(self.model_dir)
        return None

    @property
    def task(self) -> str | None:
        meta = self.meta
        return meta["task"] if meta else None


def read_run_meta(model_dir: Path) -> dict:
    f = Path(model_dir) / RUN_META
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{f}: unreadable ({type(e).__name__}: {e}); the run did not finish writing it: retrain, "
                          f"or restore the folder") from None
    if not isinstance(meta, dict) or meta.get("task") not in TASKS:
        raise RunDirError(f"{f}: 'task' must be one of {', '.join(TASKS)}; retrain, or restore the folder")
    return meta


def read_export_meta(path: str | Path) -> dict | None:
    """sftlab_export.json of an export folder; None for anything else; one line when it is unreadable."""
    f = Path(path) / EXPORT_META
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{f}: unreadable ({e}); export the run again") from None
    if not isinstance(meta, dict) or meta.get("task") not in TASKS:
        raise ExportError(f"{f}: not an sftlab export description (no valid 'task'); export the run again")
    return meta


def find_model_dir(path: str | Path) -> Path:
    """A run directory's best/ or a model folder with sftlab.json; RunDirError otherwise."""
    p = Path(path)
    for cand in (p / "best", p):
        if (cand / RUN_META).is_file():
            return cand
    raise RunDirError(f"{path}: no trained model here (expected RUN_DIR/best/sftlab.json); did training finish?")


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory that owns a model folder (RUN_DIR or RUN_DIR/best), or None for a bare model folder."""
    p = Path(path)
    for cand in (p, p.parent):
        if (cand / "config.yaml").is_file() and (cand / "best").is_dir():
            return cand
    return None

"""Baselines on the same evaluation data as the fine-tuned model (`sftlab eval RUN --baselines`).

- majority: always the most frequent training label (regression: always the training mean).
- from_scratch: the twin - same architecture, random init, full training, the run's own data and training
  budget (`model.from_scratch: true`), trained once into RUN_DIR/baselines/from_scratch/ and reused.
- decoders: the base model zero-shot and with K in-context examples from data.train (same metric).
Results go to RUN_DIR/baselines.json, keyed by the evaluation file, next to the fine-tuned model's figures.
Only what is missing is computed; `--baselines` again reuses the twin and recomputes the cheap rows.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..errors import RunDirError
from .evaluate import evaluate_file, run_dir_of, write_json
from .metrics import compute_metrics


def majority(cfg, data: str, labels: list[str] | None) -> dict:
    from ..data.examples import LabelMap, load_split

    lmap = LabelMap(labels) if labels else None
    train, _ = load_split(cfg.data, cfg.data.train, cfg.task, lmap, limit=cfg.data.limit_train)
    # the evaluation file resolves as `sftlab eval` resolves it: as given (or under SFTLAB_DATA_DIR), not data.dir
    test, _ = load_split(cfg.data.model_copy(update={"dir": None}), data, cfg.task, lmap)
    y_train = np.array([ex.label for ex in train.examples])
    y = np.array([ex.label for ex in test.examples])
    if cfg.task == "regression":
        logits = np.full((len(y), 1), float(y_train.mean()))
        name = f"mean of train ({y_train.mean():.3f})"
    else:
        top = int(np.bincount(y_train.astype(int), minlength=len(labels)).argmax())
        logits = np.zeros((len(y), len(labels)))
        logits[:, top] = 1.0
        name = f"majority class ({labels[top]})"
    return {"name": name, **compute_metrics(cfg.task, logits, y), "examples": int(len(y))}


def from_scratch(run_dir: Path, cfg) -> Path:
    """The twin's run directory, training it first if it has not finished."""
    from ..train.loop import train

    twin = run_dir / "baselines" / "from_scratch"
    if (twin / "summary.json").is_file():
        return twin
    tcfg = cfg.model_copy(deep=True)
    tcfg.model.from_scratch = True
    tcfg.strategy = type(cfg.strategy)(name="full")  # a random backbone must train; adapters on it mean nothing
    tcfg.output_dir = str(twin)
    print(f"training the from-scratch twin in {twin} (same data and budget, random init)", file=sys.stderr)
    resume = twin if (twin / "config.yaml").is_file() else None
    return train(tcfg, resume=resume)


def run_baselines(run: str, data: str, *, batch_size: int = 128, bf16: bool = True, icl_shots: int = 4,
                  labels_words: list[str] | None = None, limit: int | None = None) -> dict:
    from ..config import load_config

    run_dir = run_dir_of(run)
    if run_dir is None:
        raise RunDirError(f"{run}: --baselines needs a run directory (with config.yaml and best/)")
    cfg = load_config(str(run_dir / "config.yaml"), [])
    meta = json.loads((run_dir / "best" / "sftlab.json").read_text())
    out_file = run_dir / "baselines.json"
    table = json.loads(out_file.read_text()) if out_file.is_file() else {}
    rows: dict = {}
    if cfg.task == "causal_lm":
        from .gen_eval import evaluate_generation

        kw = dict(config=str(run_dir / "config.yaml"), labels=labels_words, limit=limit, bf16=bf16)
        rows["fine_tuned"] = evaluate_generation(str(run_dir), data, **kw)
        rows["zero_shot"] = evaluate_generation(cfg.model.name, data, **kw)
        if icl_shots:
            rows[f"icl_{icl_shots}_shot"] = evaluate_generation(cfg.model.name, data, icl_shots=icl_shots, **kw)
    else:
        rows["fine_tuned"] = evaluate_file(str(run_dir), data, batch_size=batch_size, bf16=bf16)
        rows["majority"] = majority(cfg, data, meta["labels"])
        twin = from_scratch(run_dir, cfg)
        rows["from_scratch"] = evaluate_file(str(twin), data, batch_size=batch_size, bf16=bf16)
    table[str(data)] = rows
    write_json(out_file, table)
    print(f"baselines: {out_file}", file=sys.stderr)
    return rows


PRIMARY = ("accuracy", "pearson", "label_accuracy", "exact_match", "rouge_l")
NAMES = {"majority": "the majority class", "from_scratch": "the from-scratch twin", "zero_shot": "the base model "
         "zero-shot"}


def flags(rows: dict) -> list[str]:
    """One line for each baseline the fine-tuned model does not beat on its primary metric (higher is better):
    "no better than the majority class (accuracy 0.5100 vs 0.5100)"."""
    tuned = rows.get("fine_tuned") if isinstance(rows, dict) else None
    if not isinstance(tuned, dict):
        return []
    metric = next((m for m in PRIMARY if isinstance(tuned.get(m), (int, float))), None)
    out = []
    for name, row in rows.items():
        if name == "fine_tuned" or not isinstance(row, dict) or not isinstance(row.get(metric), (int, float)):
            continue
        if tuned[metric] <= row[metric] + 1e-9:
            who = NAMES.get(name) or (f"{name[4:].split('_')[0]}-shot in-context learning" if name.startswith("icl_")
                                      else name)
            out.append(f"fine-tuned model is no better than {who} ({metric} {tuned[metric]:.4f} vs {row[metric]:.4f})")
    return out

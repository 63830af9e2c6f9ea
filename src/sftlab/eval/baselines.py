"""Baselines on the same evaluation data as the fine-tuned model (`sftlab eval RUN --baselines`).

- majority: always the most frequent training label (regression: always the training mean).
- from_scratch: the twin - same architecture, random init, full training, the run's own data and training
  budget (`model.from_scratch: true`), trained once into RUN_DIR/baselines/from_scratch/ and reused.
- decoders: the base model zero-shot and with K in-context examples from data.train (same metric).
- distilled runs: the teacher and the same student trained without distillation (`no_kd`, trained once into
  RUN_DIR/baselines/no_kd/), with parameters and speed: CPU latency for classifiers, generated tokens/s for decoders.
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
    from ..config import ObjectiveConfig

    tcfg = cfg.model_copy(deep=True)
    tcfg.model.from_scratch = True
    tcfg.strategy = type(cfg.strategy)(name="full")  # a random backbone must train; adapters on it mean nothing
    tcfg = type(cfg).model_validate(tcfg.model_dump() | {"objective": ObjectiveConfig().model_dump(),
                                                          "output_dir": str(twin)})  # plain SFT: no teacher
    print(f"training the from-scratch twin in {twin} (same data and budget, random init)", file=sys.stderr)
    resume = twin if (twin / "config.yaml").is_file() else None
    return train(tcfg, resume=resume)


def no_kd(run_dir: Path, cfg) -> Path:
    """A distilled run's twin without distillation (objective sft, all else equal), trained once and reused."""
    from ..config import ObjectiveConfig
    from ..train.loop import train

    twin = run_dir / "baselines" / "no_kd"
    if (twin / "summary.json").is_file():
        return twin
    tcfg = cfg.model_copy(deep=True, update={"objective": ObjectiveConfig()})
    tcfg = type(cfg).model_validate(tcfg.model_dump() | {"output_dir": str(twin)})
    print(f"training the same student without distillation in {twin}", file=sys.stderr)
    return train(tcfg, resume=twin if (twin / "config.yaml").is_file() else None)


def speed(folder: str | Path, texts: list[str], pairs: list[str] | None) -> dict:
    """Parameters and CPU latency of a model as `sftlab predict` runs it: ms per row at batch 1, rows/s at 32."""
    import time

    from ..export.runtime import load_exported

    exported = load_exported(folder)
    model = getattr(exported, "model", None)
    out = {"params": sum(p.numel() for p in model.parameters()) if model is not None else None}
    texts, pairs = texts[:64], (pairs[:64] if pairs else None)
    exported.logits(texts[:4], pairs[:4] if pairs else None)  # warm-up
    t0 = time.perf_counter()
    for i in range(len(texts)):
        exported.logits(texts[i:i + 1], pairs[i:i + 1] if pairs else None)
    out["ms_per_row_batch1"] = 1000 * (time.perf_counter() - t0) / max(len(texts), 1)
    exported.batch_size = 32
    t0 = time.perf_counter()
    exported.logits(texts, pairs)
    out["rows_per_s_batch32"] = len(texts) / max(time.perf_counter() - t0, 1e-9)
    return out


def _distill_rows(run_dir: Path, cfg, data: str, batch_size: int, bf16: bool, fine_tuned: dict) -> dict:
    """The teacher and the no-KD twin next to the distilled student, each with parameters and CPU latency."""
    from ..data.examples import load_split
    from ..artifacts import read_export_meta
    from ..objectives.teacher import model_folder

    split, _ = load_split(cfg.data.model_copy(update={"dir": None}), data, cfg.task, None, need_label=False)
    texts = [e.text for e in split.examples]
    pairs = [e.text_pair for e in split.examples] if split.examples and split.examples[0].text_pair else None
    teacher = model_folder(cfg.objective.teacher)
    if read_export_meta(teacher) is not None:
        from ..export.predict import evaluate_export

        t_row = evaluate_export(teacher, data, batch_size=batch_size)
    else:
        t_row = evaluate_file(str(teacher), data, batch_size=batch_size, bf16=bf16, analysis=False)
    twin = no_kd(run_dir, cfg)
    rows = {"teacher": t_row | {"name": f"teacher ({cfg.objective.teacher})"},
            "no_kd": evaluate_file(str(twin), data, batch_size=batch_size, bf16=bf16, analysis=False)}
    fine_tuned |= speed(run_dir, texts, pairs)
    rows["teacher"] |= speed(teacher, texts, pairs)
    rows["no_kd"] |= speed(twin, texts, pairs)
    return rows


def run_baselines(run: str, data: str, *, batch_size: int = 128, bf16: bool = True, icl_shots: int = 4,
                  labels_words: list[str] | None = None, limit: int | None = None) -> dict:
    from ..config import load_config

    run_dir = run_dir_of(run)
    if run_dir is None:
        raise RunDirError(f"{run}: --baselines needs a run directory (with config.yaml and best/)")
    cfg = load_config(str(run_dir / "config.yaml"), [])
    if cfg.task == "multitask":
        raise RunDirError(f"{run}: --baselines compares one task's model; for a multitask run compare each task's "
                          "single-task run (benchmarks/glue_multitask.py does)")
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
        if cfg.objective.name == "distill":  # the teacher and the same student without KD (trained once, reused)
            from ..objectives.teacher import model_folder

            teacher = str(model_folder(cfg.objective.teacher))  # its analysis stays out of the teacher's run
            rows["teacher"] = evaluate_generation(teacher, data, analysis=False, **kw) | {
                "name": f"teacher ({cfg.objective.teacher})"}
            rows["no_kd"] = evaluate_generation(str(no_kd(run_dir, cfg)), data, **kw)
    else:
        rows["fine_tuned"] = evaluate_file(str(run_dir), data, batch_size=batch_size, bf16=bf16)
        rows["majority"] = majority(cfg, data, meta["labels"])
        twin = from_scratch(run_dir, cfg)
        rows["from_scratch"] = evaluate_file(str(twin), data, batch_size=batch_size, bf16=bf16)
        if cfg.objective.name == "distill":
            rows |= _distill_rows(run_dir, cfg, data, batch_size, bf16, rows["fine_tuned"])
    table[str(data)] = rows
    write_json(out_file, table)
    print(f"baselines: {out_file}", file=sys.stderr)
    return rows


PRIMARY = ("accuracy", "pearson", "label_accuracy", "exact_match", "rouge_l")
NAMES = {"majority": "the majority class", "from_scratch": "the from-scratch twin", "zero_shot": "the base model "
         "zero-shot", "no_kd": "the same student trained without distillation", "teacher": "the teacher"}


def flags(rows: dict) -> list[str]:
    """One line for each baseline the fine-tuned model does not beat on its primary metric (higher is better):
    "no better than the majority class (accuracy 0.5100 vs 0.5100)"."""
    tuned = rows.get("fine_tuned") if isinstance(rows, dict) else None
    if not isinstance(tuned, dict):
        return []
    metric = next((m for m in PRIMARY if isinstance(tuned.get(m), (int, float))), None)
    out = []
    for name, row in rows.items():
        if name in ("fine_tuned", "teacher") or not isinstance(row, dict) or not isinstance(row.get(metric),
                                                                                             (int, float)):
            continue  # a student below its teacher is the expected case, not a warning
        if tuned[metric] <= row[metric] + 1e-9:
            who = NAMES.get(name) or (f"{name[4:].split('_')[0]}-shot in-context learning" if name.startswith("icl_")
                                      else name)
            out.append(f"fine-tuned model is no better than {who} ({metric} {tuned[metric]:.4f} vs {row[metric]:.4f})")
    return out

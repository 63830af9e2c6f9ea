"""The run directory: created once, never silently overwritten; the best model as a plain HF folder.

RUN_DIR/config.yaml        resolved config            RUN_DIR/metrics.jsonl   train and dev records
RUN_DIR/checkpoints/       resumable state            RUN_DIR/summary.json    figures of the finished run
RUN_DIR/best/              `transformers.pipeline` loads it as-is; sftlab.json holds task and label map
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ..config import RunConfig, dump_config
from ..errors import RunDirError


# Settings that decide which model is trained on what: a resume that changes one would continue another run's
# model on other data (or crash on a changed task). Refused unless --force-resume; other changes are listed.
IDENTITY = (("task",), ("model", "name"), ("model", "from_scratch"), ("model", "keep_layers"), ("strategy", "name"),
            ("data", "dir"),
            ("data", "train"), ("data", "text"), ("data", "text_pair"), ("data", "label"), ("data", "labels"),
            ("data", "format"), ("data", "prompt"), ("data", "completion"), ("data", "label_words"),
            ("objective", "name"))
LABELS_FILE = "labels.json"  # the class names in id order the run's model was built with


def open_run_dir(cfg: RunConfig, resume, overwrite: bool, main: bool, barrier=lambda: None,
                 force_resume: bool = False) -> Path:
    """Every process checks, then (after `barrier`) the main one creates: no rank sees another's mkdir."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"--resume {resume}: not a run directory (no config.yaml)")
        _check_changes(run_dir, cfg, force_resume)
        return run_dir
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"output_dir {run_dir} exists and is not empty; continue it with --resume {run_dir}, "
                "choose another output_dir, or pass --overwrite to replace it"
            )
    barrier()
    if main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        except OSError as e:
            raise RunDirError(f"output_dir {run_dir}: cannot write ({e.strerror}); choose a writable folder") from None
    return run_dir


def _check_changes(run_dir: Path, cfg: RunConfig, force: bool) -> None:
    import sys

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunDirError(f"--resume {run_dir}: config.yaml is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise RunDirError(f"--resume {run_dir}: config.yaml is not a mapping; is this a run directory?")
    now = cfg.model_dump(mode="json")

    def at(tree, key):
        for part in key:
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    fatal = [f"{'.'.join(k)}: {at(saved, k)!r} -> {at(now, k)!r}" for k in IDENTITY if at(saved, k) != at(now, k)]
    if fatal and not force:
        raise RunDirError(f"--resume {run_dir}: the config names another run ({'; '.join(fatal)}); resume with the "
                          f"run's own config (sftlab train {run_dir / 'config.yaml'} --resume {run_dir}), start a new "
                          f"run, or pass --force-resume to continue this model anyway")
    diffs = [
        f"{sec}.{k}: {saved[sec].get(k)!r} -> {v!r}"
        for sec in ("model", "data", "strategy", "objective", "train")
        for k, v in now[sec].items()
        if isinstance(saved.get(sec), dict) and saved[sec].get(k) != v and (sec, k) not in IDENTITY
    ]
    if fatal:
        print(f"note: --force-resume: continuing with changed identity settings: {'; '.join(fatal)}", file=sys.stderr)
    if diffs:
        print(f"note: resuming with changed settings: {'; '.join(diffs)}", file=sys.stderr)


def check_labels(run_dir: Path, labels: list[str] | None, resumed: bool, main: bool, force: bool = False) -> None:
    """A fresh run records its label names; a resumed one must find the same (derived from data when data.labels is
    unset, so a config check alone cannot see a changed label set). Runs older than the record: best/sftlab.json."""
    file = run_dir / LABELS_FILE
    if not resumed:
        if main:
            file.write_text(json.dumps(labels) + "\n", encoding="utf-8")
        return
    before = None
    for source, key in ((file, None), (run_dir / "best" / "sftlab.json", "labels")):
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        before = data.get(key) if key and isinstance(data, dict) else data
        break
    if before is not None and labels is not None and list(before) != list(labels) and not force:
        raise RunDirError(f"--resume {run_dir}: the run's model was built for labels {before} and the data now gives "
                          f"{labels}; resume with the run's own data, or pass --force-resume")


def save_best(run_dir: Path, model, tokenizer, cfg: RunConfig, labels, step: int, scores: dict,
              state_dict: dict | None = None) -> None:
    """Write RUN_DIR/best atomically (tmp folder, then swap). `state_dict`: the full weights of a sharded model."""
    final, tmp, old = run_dir / "best", run_dir / ".best.tmp", run_dir / ".best.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "sftlab_adapters"):  # bottleneck adapters: only what trained, plus the base's config
        from ..strategies.adapter import save_adapter

        tmp.mkdir()
        model.config.save_pretrained(tmp)
        save_adapter(model, tmp)
        adapter = "bottleneck"
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        adapter = "peft" if (tmp / "adapter_config.json").is_file() else None
    tokenizer.save_pretrained(tmp)
    from ..models import resolve_model

    base_path = resolve_model(cfg.model.name) if adapter else None
    if base_path and Path(base_path).exists():  # a local folder: absolute, so eval works from any directory
        base_path = str(Path(base_path).resolve())
    meta = {
        "task": cfg.task, "labels": labels, "max_length": cfg.data.max_length, "adapter": adapter,
        "base_path": base_path,
        "template": cfg.data.template, "system_prompt": cfg.data.system_prompt,
        "text_pair": cfg.data.text_pair is not None, "step": step, "dev_metrics": scores,
        "base_model": cfg.model.name, "strategy": cfg.strategy.name, "keep_layers": cfg.model.keep_layers,
    }
    from ..models.pooling import pooling_of

    if pooling_of(model) == "mean":  # (an adapter's base loads by name: its config.json does not say it)
        meta["pooling"] = "mean"
    (tmp / "sftlab.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

"""What an export reports: parity with the run's in-memory model, folder size, latency, dev metric against fp32."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

# Parity inputs when no dev data resolves (real dev rows are used whenever they do).
FALLBACK = ["the film was great", "a dull, lifeless and far too long evening at the cinema", "ok",
            "I would not recommend this hotel to anyone, the staff were rude and the room was dirty",
            "brilliant!", "it was neither good nor bad, just there", "what a waste of time", "lovely meal"]
REPS = {1: 30, 32: 7}  # timed repetitions per batch size (after one warm-up call); the median is reported


@dataclass
class EvalData:
    texts: list[str]
    pairs: list[str] | None
    y: np.ndarray | None
    source: str


def eval_data(model_dir: Path, meta: dict, data: str | None) -> EvalData | None:
    """`data` (labelled, the training layout) or else the run's own dev file; None when neither resolves."""
    from ..data.examples import LabelMap, load_split, resolve_path
    from ..eval.evaluate import _data_config

    if meta["task"] == "causal_lm":
        return None
    dcfg = _data_config(model_dir, {})
    if data is None:
        cfg_file = next((c / "config.yaml" for c in (model_dir, model_dir.parent) if (c / "config.yaml").is_file()),
                        None)
        run_data = (yaml.safe_load(cfg_file.read_text()) or {}).get("data", {}) if cfg_file else {}
        if not run_data.get("dev"):
            return None
        dcfg = _data_config(model_dir, {"dir": run_data.get("dir")})
        if not Path(resolve_path(dcfg, run_data["dev"])).is_file():
            return None
        data = run_data["dev"]
    labels = LabelMap(meta["labels"]) if meta.get("labels") else None
    split, _ = load_split(dcfg, data, meta["task"], labels)
    ex = split.examples
    pairs = [e.text_pair for e in ex] if ex[0].text_pair is not None else None
    return EvalData([e.text for e in ex], pairs, np.array([e.label for e in ex]), split.source)


def samples(data: EvalData | None, meta: dict, n: int = 64) -> tuple[list[str], list[str] | None]:
    """Real inputs for the parity check: the first n rows of the data, else FALLBACK."""
    if data is not None:
        return data.texts[:n], data.pairs[:n] if data.pairs else None
    return FALLBACK, (FALLBACK[::-1] if meta.get("text_pair") else None)


def task_samples(model_dir: Path, meta: dict, n: int = 32) -> list[tuple[list[str], list[str] | None]]:
    """A multitask model's parity inputs: the first n dev rows of each task whose dev file resolves (its own
    columns), else FALLBACK texts and FALLBACK pairs."""
    from ..data.examples import load_split, resolve_path
    from ..eval.evaluate import _data_config

    cfg_file = next((c / "config.yaml" for c in (model_dir, model_dir.parent) if (c / "config.yaml").is_file()), None)
    saved = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file else {}
    out = []
    for name, entry in (saved.get("tasks") or {}).items():
        dcfg = _data_config(model_dir, {"dir": (saved.get("data") or {}).get("dir")}, name)
        if entry.get("dev") and Path(resolve_path(dcfg, entry["dev"])).is_file():
            split, _ = load_split(dcfg, entry["dev"], entry.get("task", "classification"), None, need_label=False)
            ex = split.examples[:n]
            out.append(([e.text for e in ex], [e.text_pair for e in ex] if ex[0].text_pair is not None else None))
    return out or [(FALLBACK, None), (FALLBACK, FALLBACK[::-1])]


def decoder_logits(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Every position's logits of every text (one at a time, no padding), concatenated: [sum of lengths, vocab]."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return np.concatenate([model(**tokenizer(t, return_tensors="pt").to(device)).logits[0].float().cpu().numpy()
                               for t in texts])


def latency_ms(logits_fn, texts: list[str], pairs: list[str] | None, batch: int) -> float:
    """Median wall time of one call on `batch` inputs (batch 1: a median-length input; else the first rows)."""
    if batch == 1:
        i = sorted(range(len(texts)), key=lambda k: len(texts[k]))[len(texts) // 2]
        idx = [i]
    else:
        idx = [k % len(texts) for k in range(batch)]
    t, p = [texts[k] for k in idx], [pairs[k] for k in idx] if pairs else None
    logits_fn(t, p)
    times = []
    for _ in range(REPS.get(batch, 5)):
        start = time.perf_counter()
        logits_fn(t, p)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def figures(runtime, data: EvalData | None) -> dict:
    """Latency at batch 1 and 32 and, with labelled data, the metrics (plus the logits, for comparisons)."""
    from ..eval.metrics import compute_metrics

    texts, pairs = (data.texts, data.pairs) if data else (FALLBACK, None)
    out = {"latency_ms": {f"batch_{b}": latency_ms(runtime.logits, texts, pairs, b) for b in (1, 32)}}
    if data is not None:
        logits = runtime.logits(data.texts, data.pairs)
        out |= {"metrics": compute_metrics(runtime.task, logits, data.y), "_logits": logits}
    return out


def compare(task: str, ref: dict, got: dict) -> dict:
    """Metric change and prediction agreement of an export against the fp32 reference on the same data."""
    if "metrics" not in got:
        return {}
    out = {"metric_change": {k: round(got["metrics"][k] - ref["metrics"][k], 6) for k in got["metrics"]}}
    a, b = ref["_logits"], got["_logits"]
    out["max_abs_logit_diff_dev"] = float(np.abs(a - b).max())
    if task == "classification":
        out["argmax_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6, 3)


def weights_mb(model) -> float:
    return round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6, 3)

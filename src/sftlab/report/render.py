"""From `Run`s to one self-contained HTML file: summary table, overlaid curves, per-run analysis, config.

Every cell is formatted here (floats to 4 decimals, integers with thousands separators) and escaped by the
template (Jinja2 autoescape), so data texts, config values and model outputs can never become markup.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from . import plots
from .collect import Run

METRIC_ORDER = ("accuracy", "macro_f1", "mcc", "pearson", "spearman", "mse", "label_accuracy", "exact_match",
                "bleu", "rouge_l", "ref_perplexity", "ref_loss", "loss", "perplexity")
NOT_METRICS = {"examples", "count", "truncated", "skipped", "icl_shots", "tokens", "name", "step", "split", "epoch"}


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def cell(v, cls: str = "") -> tuple[str, str]:
    return fmt(v), cls or ("num" if isinstance(v, (int, float)) and not isinstance(v, bool) else "")


def metric_keys(dicts) -> list[str]:
    """Numeric keys of metric dicts, known metrics first in a fixed order, then the rest by name."""
    seen = {k for d in dicts for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS}
    return [k for k in METRIC_ORDER if k in seen] + sorted(seen - set(METRIC_ORDER))


def summary_rows(runs: list[Run]) -> list[tuple[str, list]]:
    s = [r.summary or {} for r in runs]
    rows = [("task", [cell(r.task) for r in runs]),
            ("model", [cell((r.config.get("model") or {}).get("name")) for r in runs]),
            # the resolved config lists every strategy option, most unused by the chosen one: the name only here
            ("strategy", [cell((r.config.get("strategy") or {}).get("name")) for r in runs])]
    objectives = [(r.config.get("objective") or {}) for r in runs]
    if any(o.get("name", "sft") != "sft" for o in objectives):  # distill: the teacher, T and alpha too
        rows.append(("objective", [cell(" ".join(f"{k}={v}" for k, v in o.items() if k in ("name", "teacher",
                                                                                          "temperature", "alpha")))
                                   for o in objectives]))
    if any(r.config.get("model", {}).get("keep_layers") for r in runs):
        rows.append(("kept layers", [cell(str((r.config.get("model") or {}).get("keep_layers") or "all"))
                                     for r in runs]))
    rows.append(("best metric", [cell(r.best_metric) for r in runs]))
    for split in ("dev", "test"):
        for k in metric_keys(x.get(f"{split}_metrics") for x in s):
            rows.append((f"{split} {k}", [cell((x.get(f"{split}_metrics") or {}).get(k)) for x in s]))
    for label, key in (("best step", "best_step"), ("steps", "steps"), ("final train loss", "final_loss"),
                       ("train seconds", "train_seconds"), ("examples/s", "train_examples_per_s"),
                       ("tokens/s", "train_tokens_per_s"), ("peak RSS MB", "peak_rss_mb"),
                       ("peak GPU MB", "peak_gpu_mb"), ("device", "device")):
        if any(key in x for x in s):
            rows.append((label, [cell(x.get(key)) for x in s]))
    trainable = []
    for x in s:
        t, total = x.get("trainable_params"), x.get("total_params")
        trainable.append(cell(f"{t:,} ({100 * t / total:.4f}%)" if t is not None and total else t, "num"))
    rows.append(("trainable params", trainable))
    return rows


def curve_plots(runs: list[Run]) -> dict[str, str | None]:
    def series(records_of, key):
        out = []
        for r in runs:
            recs = [x for x in records_of(r) if isinstance(x.get(key), (int, float))]
            out.append((r.name, [x["step"] for x in recs], [x[key] for x in recs]))
        return out

    dev_metrics = list(dict.fromkeys([r.best_metric for r in runs] + ["loss"]))
    # An objective's named loss parts (distill: loss/hard, loss/soft), one line per run and part.
    parts = sorted({k for r in runs for x in r.train for k in x if k.startswith("loss/")})
    part_series = [(f"{name} {key[5:]}", xs, ys) for key in parts
                   for name, xs, ys in series(lambda r: r.train, key)]
    return {
        "loss": plots.curve(series(lambda r: r.train, "loss"), "Training loss", "loss (mean per logged window)"),
        "parts": plots.curve(part_series, "Loss parts", "part (mean per logged window)") if parts else None,
        "dev": plots.dev_curves([(m, series(lambda r: r.dev, m)) for m in dev_metrics]),
        "lr": plots.curve(series(lambda r: r.train, "lr"), "Learning rate", "learning rate", sci=True),
        "throughput": plots.curve(series(lambda r: r.train, "examples_per_s"), "Training throughput",
                                  "examples / s"),
    }


def analysis_view(run: Run, a, first: bool) -> dict:
    b = a.body
    suffix = "" if first else f"-{a.stem}"
    view = {"stem": a.stem, "data": b.get("data", a.stem), "step": b.get("step"), "examples": b.get("examples"),
            "task": b.get("task", run.task), "suffix": suffix, "tables": [], "confusion": None,
            "reliability": None}
    m = b.get("metrics") or {}
    keys = metric_keys([m])
    view["metrics"] = {"head": keys, "rows": [[cell(m.get(k)) for k in keys]]}
    conf = b.get("confusion")
    if conf and conf.get("labels"):
        view["confusion"] = plots.confusion(conf["labels"], conf["matrix"],
                                            f"Confusion matrix — {run.name} ({a.stem})")
    cal = b.get("calibration")
    if cal and cal.get("bins"):
        view["reliability"] = plots.reliability(cal["bins"], cal.get("ece", float("nan")),
                                                f"Reliability — {run.name} ({a.stem})")
        view["ece"] = cal.get("ece")
    if b.get("per_class"):
        head = ["label", "precision", "recall", "f1", "support"]
        view["tables"].append(("per-class", "Per class", head,
                               [[cell(r.get(k)) for k in head] for r in b["per_class"]]))
    if b.get("by_length"):
        keys = ["tokens", "count"] + metric_keys(b["by_length"])
        view["tables"].append(("by-length", "By input length (tokens)", keys,
                               [[cell(r.get(k)) for k in keys] for r in b["by_length"]]))
    worst = b.get("worst") or []
    if view["task"] == "causal_lm":
        head, title = ["prompt", "reference", "output", "rouge_l"], "Worst outputs (lowest ROUGE-L)"
        texts = {"prompt", "reference", "output"}
        if any(w.get("parsed") is not None for w in worst):  # eval ran with --labels: the label word found
            head.insert(3, "parsed")
        worst = [w | {"output": w.get("output") or "(empty output)"} for w in worst]
    elif view["task"] == "regression":
        head, title, texts = ["text", "target", "prediction", "abs_error"], "Largest errors", {"text"}
    else:
        head, title, texts = ["text", "label", "predicted", "confidence"], "Most confident mistakes", {"text"}
    view["worst"] = {"title": f"{title} ({len(worst)})", "head": ["#"] + head,
                     "rows": [[cell(i + 1)] + [cell(w.get(k), "text" if k in texts else "") for k in head]
                              for i, w in enumerate(worst)]}
    return view


def baseline_views(run: Run) -> list[dict]:
    def order(name: str):
        if name.startswith("icl_"):
            return 2, int("".join(c for c in name if c.isdigit()) or 0)
        rank = {"majority": 0, "zero_shot": 1, "from_scratch": 3, "no_kd": 4, "fine_tuned": 5, "teacher": 6}
        return rank.get(name, 7), 0

    def label(name: str, row: dict) -> str:
        if name.startswith("icl_"):
            return f"{name[4:].split('_')[0]}-shot ICL (base model)"
        return {"majority": row.get("name") or "majority class", "zero_shot": "zero-shot (base model)",
                "from_scratch": "from-scratch twin", "fine_tuned": "fine-tuned (this run)",
                "no_kd": "same student without distillation", "teacher": row.get("name") or "teacher"}.get(name, name)

    views = []
    for data, rows in (run.baselines or {}).items():
        rows = {k: v for k, v in rows.items() if isinstance(v, dict)} if isinstance(rows, dict) else {}
        if not rows:
            continue
        names = sorted(rows, key=order)
        keys = metric_keys(rows.values()) + ["examples"] + [k for k in ("params", "ms_per_row_batch1",
                                                                         "rows_per_s_batch32")
                                                              if any(k in r for r in rows.values())]
        from ..eval.baselines import flags

        views.append({"data": data, "head": ["model"] + keys, "flags": flags(rows),
                      "rows": [[cell(label(n, rows[n]))] + [cell(rows[n].get(k)) for k in keys] for n in names]})
    return views


def context(runs: list[Run]) -> dict:
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": runs, "summary": summary_rows(runs), "curves": curve_plots(runs),
        "per_run": [{"run": r, "analyses": [analysis_view(r, a, k == 0) for k, a in enumerate(r.analyses)],
                     "baselines": baseline_views(r)} for r in runs],
    }


def render(runs: list[Run]) -> str:
    from .template import TEMPLATE, environment

    return environment().from_string(TEMPLATE).render(**context(runs))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

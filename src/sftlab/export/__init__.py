"""`sftlab export RUN_DIR --format FORMAT --out DIR`: a run's best model as a folder other tools load directly.

Formats: hf (plain HF folder), merged (LoRA/DoRA folded into the base; same folder as hf), peft (the adapter
alone), onnx (fp32 graph for onnxruntime), int8 (onnxruntime dynamic int8). Every folder holds sftlab_export.json
(task, labels, max_length, ... and `report`: the figures) and no pickle. The equation every export must meet
before it is moved into place: the exported model's logits == the run's in-memory PyTorch logits on real inputs
(hf, merged, peft within 1e-5; onnx 1e-4; int8 reports its difference, agreement and dev-metric change).
The folder is written under a temporary name and renamed at the end: nothing half-written is ever at --out.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .runtime import EXPORT_META, FORMATS, TorchExported, load_exported

TOLERANCE = {"hf": 1e-5, "merged": 1e-5, "peft": 1e-5, "onnx": 1e-4}  # max |logit difference| vs PyTorch fp32
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def export(run_dir, fmt: str, out=None, *, data: str | None = None, overwrite: bool = False,
           threads: int | None = None, log=None) -> dict:
    """Writes the export folder and returns its report (also in sftlab_export.json); `out` defaults to
    RUN_DIR/export/FORMAT; `threads`: torch and onnxruntime threads for the timings (default: torch's).
    Raises ExportError (one line) for a refused format, a busy --out or a failed parity check."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _export(run_dir, fmt, out, data=data, overwrite=overwrite, log=log)
    finally:
        torch.set_num_threads(before)


def _export(run_dir, fmt, out, *, data, overwrite, log) -> dict:
    from ..artifacts import find_model_dir, run_dir_of
    from ..eval.evaluate import _data_config, load_trained
    from .measure import compare, decoder_logits, eval_data, figures, folder_mb, samples, task_samples, weights_mb
    from .merged import check_format, fold

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    model_dir = find_model_dir(run_dir)
    meta = json.loads((model_dir / "sftlab.json").read_text())
    check_format(fmt, meta, model_dir)
    if fmt in ("onnx", "int8"):
        _need_onnx(fmt)
    source = run_dir_of(model_dir) or model_dir
    out = Path(out) if out else source / "export" / fmt
    _check_out(out, model_dir, overwrite)

    log(f"export {fmt}: loading {model_dir}")
    model, tokenizer, _ = load_trained(model_dir, device="cpu")
    from ..models.pooling import pooling_of

    if pooling_of(model) == "mean" and fmt in ("hf", "merged", "peft"):
        log(f"note: this model's head reads the mean of the token states (model.pooling: mean; config.json "
            f"sftlab_pooling). sftlab's loaders apply it; plain transformers reads [CLS] instead: load with "
            f"sftlab.export.runtime.load_exported, or export --format onnx, whose graph holds it")
    decoder, multitask = meta["task"] == "causal_lm", meta["task"] == "multitask"
    edata = None if multitask else eval_data(model_dir, meta, data)  # (multitask: parity per head, no dev metrics)
    groups = task_samples(model_dir, meta) if multitask else [samples(edata, meta)]

    def logits_of(runtime) -> list[np.ndarray]:  # every head's columns side by side for a multitask model
        return [runtime.logits(t, p) for t, p in groups]

    texts = groups[0][0]
    ref = [decoder_logits(model, tokenizer, texts)] if decoder else logits_of(TorchExported(meta, tokenizer, model))
    cols = _data_config(model_dir, {})
    export_meta = {k: meta.get(k) for k in ("task", "labels", "max_length", "text_pair", "template", "system_prompt",
                                            "base_model", "strategy")}
    export_meta = {"format": fmt, **export_meta, "source_run": str(Path(source).resolve()),
                   "source_step": meta.get("step"),
                   "columns": {"text": cols.text, "text_pair": cols.text_pair, "label": cols.label,
                               "header": cols.header}}
    if multitask:  # each task's own columns, for `eval` / `predict --task NAME` on the export
        export_meta["task_columns"] = {
            h["name"]: {k: getattr(c, k) for k in ("text", "text_pair", "label", "header")}
            for h in meta["labels"] for c in [_data_config(model_dir, {}, h["name"])]}
    if fmt == "peft":
        export_meta["base_path"] = meta["base_path"]
        export_meta["keep_layers"] = meta.get("keep_layers")
        if meta.get("pooling"):
            export_meta["pooling"] = meta["pooling"]

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fp32 = {}
        if fmt == "peft":
            from .peft_format import write_peft

            info = write_peft(model_dir, meta, tmp)
        else:
            model = fold(model)
            fp32 = {"weights_mb": weights_mb(model)}
            if fmt in ("onnx", "int8"):
                log(f"export {fmt}: fp32 PyTorch reference (latency{', ' + edata.source if edata else ''})")
                fp32 |= figures(TorchExported(meta, tokenizer, model), edata)
            log(f"export {fmt}: writing")
            info = _writer(fmt)(model, tokenizer, meta, tmp)
        _write_json(tmp / EXPORT_META, export_meta)
        loaded = load_exported(tmp)
        got = [decoder_logits(loaded.model, loaded.tokenizer, texts)] if decoder else logits_of(loaded)
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        tol = TOLERANCE.get(fmt)
        where = f"{sum(len(t) for t, _ in groups)} {'dev' if edata or multitask else 'sample'} inputs"
        per_head = {name: max(float(np.abs(g[:, c] - r[:, c]).max()) for g, r in zip(got, ref))
                    for name, c in loaded.columns.items()} if multitask else None
        if tol is not None and not diff <= tol:
            raise ExportError(f"--format {fmt}: parity check failed: max |logit difference| {diff:.3g} > {tol:g} "
                              f"against the run's PyTorch model on {where}; nothing was written to {out}")
        log(f"export {fmt}: parity max |logit difference| {diff:.3g} on {where}")
        report = {**info, "parity": {"max_abs_logit_diff": diff, "tolerance": tol, "inputs": where},
                  "size_mb": folder_mb(tmp)}
        if per_head:
            report["parity"]["per_head"] = per_head
            log(f"export {fmt}: parity per head " + ", ".join(f"{k} {v:.3g}" for k, v in per_head.items()))
        if fmt in ("onnx", "int8"):
            log(f"export {fmt}: timing and dev metrics")
            got_fig = figures(loaded, edata)
            report |= {"threads": torch.get_num_threads(), "latency_ms": got_fig["latency_ms"],
                       "metrics": got_fig.get("metrics"), **compare(meta["task"], fp32, got_fig),
                       "data": edata.source if edata else None, "examples": len(edata.texts) if edata else 0}
        if fp32:
            report["fp32"] = {k: v for k, v in fp32.items() if not k.startswith("_")}
        export_meta["report"] = report
        _write_json(tmp / EXPORT_META, export_meta)
        _no_pickle(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report | {"out": str(out)}


def _need_onnx(fmt: str) -> None:
    import importlib.util

    missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}: pip install 'sftlab[export]'")


def _writer(fmt: str):
    if fmt in ("hf", "merged"):
        from .hf import write_hf as w
    elif fmt == "onnx":
        from .onnx import write_onnx as w
    else:
        from .int8 import write_int8 as w
    return w


def _check_out(out: Path, model_dir: Path, overwrite: bool) -> None:
    src = model_dir.resolve()
    if out.resolve() == src or out.resolve() in src.parents:
        raise ExportError(f"--out {out}: that would replace the run itself; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty; choose another --out or add --overwrite "
                          f"(nothing was written)")


def _swap(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished `tmp` by renames: a reader sees the old folder or the new one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _no_pickle(folder: Path) -> None:
    bad = [f.name for f in folder.rglob("*") if f.suffix in PICKLE_SUFFIXES]
    if bad:
        raise ExportError(f"export wrote pickle files {bad}; refusing (sftlab ships safetensors/ONNX + JSON only)")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def format_report(report: dict) -> str:
    """The figures as a few human lines (stderr)."""
    lines = [f"size {report['size_mb']:.1f} MB; parity max |logit diff| {report['parity']['max_abs_logit_diff']:.3g}"
             f" on {report['parity']['inputs']}"]
    fp32 = report.get("fp32", {})
    if "latency_ms" in report:
        lat, ref = report["latency_ms"], fp32.get("latency_ms", {})
        lines.append(f"latency ms (median, threads={report['threads']}): batch 1 {lat['batch_1']:.2f} "
                     f"(fp32 PyTorch {ref.get('batch_1', float('nan')):.2f}), batch 32 {lat['batch_32']:.1f} "
                     f"(fp32 PyTorch {ref.get('batch_32', float('nan')):.1f}); fp32 weights {fp32['weights_mb']:.1f} MB")
    if report.get("metrics"):
        change = report.get("metric_change", {})
        lines.append(f"{report['data']} ({report['examples']} rows): " + ", ".join(
            f"{k} {v:.4f} ({change.get(k, 0):+.4f} vs fp32)" for k, v in report["metrics"].items()))
        if "argmax_agreement" in report:
            lines.append(f"same prediction as fp32 on {100 * report['argmax_agreement']:.2f}% of rows")
    return "\n".join(lines)

"""`onnx`: the classifier as one ONNX graph (fp32) for onnxruntime, with dynamic batch and sequence axes.

Exporter: torch 2.13's `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). The legacy TorchScript
exporter (`dynamo=False`) still exists but traces transformers 5's mask code into constants: on minilm-l6 it gave
logits off by up to 2.9 on inputs shaped unlike the example. The dynamo graph matches PyTorch to ~1e-6.
Opset 20 (what this exporter emits natively; onnxruntime >= 1.17 runs it). LoRA/DoRA are merged first; our
bottleneck adapters run on forward hooks, which torch.export traces, so they are in the graph.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import torch

from .merged import fold, label_config
from .runtime import ONNX_FILE

OPSET = 20
EXAMPLE = ["an example sentence, long enough to have several tokens", "a shorter one"]


def write_onnx(model, tokenizer, meta: dict, out: Path) -> dict:
    from ..models.multihead import ALL, active_head

    model = fold(model).float().cpu().eval()
    multitask = meta["task"] == "multitask"
    if not multitask:  # (a multitask graph outputs every head's logits side by side: sftlab_export.json says which)
        label_config(model, meta)
    pairs = EXAMPLE[::-1] if meta.get("text_pair") else None
    # batch 2 and two lengths: torch.export specialises a dimension whose example size is 0 or 1
    enc = dict(tokenizer(EXAMPLE, pairs, padding=True, return_tensors="pt"))
    limit = getattr(model.config, "max_position_embeddings", None)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=limit)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9  # ONNX protobuf limit is 2 GB
    with _quiet(), torch.inference_mode(False), torch.no_grad(), \
            active_head(model, ALL) if multitask else contextlib.nullcontext():
        program = torch.onnx.export(model, (), kwargs=enc, dynamo=True, opset_version=OPSET,
                                    input_names=list(enc), output_names=["logits"],
                                    dynamic_shapes={k: {0: batch, 1: seq} for k in enc}, external_data=big)
        program.save(str(out / ONNX_FILE), external_data=big)
    model.config.save_pretrained(out)  # config.json: label names; optimum's ORTModel reads it next to model.onnx
    tokenizer.save_pretrained(out)
    return {"opset": OPSET, "exporter": f"torch.onnx dynamo (torch {torch.__version__.split('+')[0]})",
            "inputs": list(enc)}


@contextlib.contextmanager
def _quiet():
    """The exporter prints its steps to stdout and warns about axis names; stdout is the CLI's result channel."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

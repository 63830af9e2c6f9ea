"""Which formats a run can become, and folding LoRA/DoRA into the base weights (shared by hf, merged, onnx, int8).

What a plain HF folder can hold is the HF architecture's own parameters. LoRA and DoRA fold into them exactly
(W + BA, DoRA's magnitude rescale; peft's `merge_and_unload`). Prompt/prefix tuning add virtual tokens and our
bottleneck adapters add modules on forward hooks: neither has a place in the architecture, so hf/merged refuse
them and name what works. Every refusal is decided from the run's files, before any weight is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExportError

FOLDABLE = {"LORA"}  # DoRA is peft_type LORA with use_dora=true


def adapter_kind(model_dir: Path, meta: dict) -> str | None:
    """None (full weights), "bottleneck" (ours), or peft's type: "LORA", "PROMPT_TUNING", "PREFIX_TUNING", ..."""
    adapter = meta.get("adapter")
    if not adapter:
        return None
    if adapter == "bottleneck":
        return "bottleneck"
    cfg = Path(model_dir) / "adapter_config.json"
    return json.loads(cfg.read_text())["peft_type"] if cfg.is_file() else "LORA"


def check_format(fmt: str, meta: dict, model_dir: Path) -> None:
    """Raises ExportError (one line, naming what works) when `fmt` cannot be made from this run."""
    kind = adapter_kind(model_dir, meta)
    strategy = meta.get("strategy") or (kind or "full").lower()
    decoder = meta["task"] == "causal_lm"
    if fmt in ("onnx", "int8") and decoder:
        raise ExportError(f"--format {fmt}: decoders are not exported to ONNX here (generation needs a KV-cache "
                          f"decode loop that sftlab runs in PyTorch); use --format merged (or hf, or peft for "
                          f"an adapter run) and serve or generate from that folder")
    if fmt in ("hf", "merged") and kind == "bottleneck":
        raise ExportError(f"--format {fmt}: sftlab's bottleneck adapters are extra modules the HF architecture has "
                          f"no place for, so a plain HF folder cannot hold them; use --format onnx or int8 (the "
                          f"graph includes the adapters), or serve the run directory itself")
    if fmt in ("hf", "merged") and kind not in (None, "bottleneck") and kind not in FOLDABLE:
        raise ExportError(f"--format {fmt}: {strategy} ({kind}) adds virtual tokens that cannot be folded into "
                          f"the base weights; use --format peft (PeftModel.from_pretrained loads it on the base), "
                          f"or serve the run directory itself")
    if fmt in ("onnx", "int8") and kind not in (None, "bottleneck") and kind not in FOLDABLE:
        raise ExportError(f"--format {fmt}: {strategy} ({kind}) virtual tokens do not trace to ONNX "
                          f"(torch.export fails inside peft); use --format peft, or serve the run directory itself")
    if fmt == "peft" and kind is None:
        raise ExportError(f"--format peft: this run trained all its weights (strategy {strategy}); there is no "
                          f"adapter to export; use --format hf")
    if fmt == "peft" and kind == "bottleneck":
        raise ExportError("--format peft: sftlab's bottleneck adapters are not a peft method, so "
                          "PeftModel cannot load them; use --format onnx or int8, or serve the run directory itself")
    if fmt == "peft" and meta.get("keep_layers"):
        raise ExportError("--format peft: the adapter sits on a base cut to model.keep_layers, which "
                          "PeftModel.from_pretrained (loading the full base by name) would not rebuild; use --format "
                          "merged (or onnx / int8)")


def fold(model):
    """The model with LoRA/DoRA merged into its weights and peft's wrappers gone (in place); others unchanged."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model


def label_config(model, meta: dict) -> None:
    """config.json names the classes, so `pipeline("text-classification")` answers with label names."""
    if meta["task"] == "classification":
        names = list(meta["labels"])
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    elif meta["task"] == "regression":
        model.config.problem_type = "regression"

"""Load any `sftlab export` folder (or a run directory) behind one interface: texts in, logits out.

`load_exported(dir)` -> `Exported` for classifiers/regressors (hf, merged, peft, onnx, int8, run dir): `.meta`,
`.task`, `.labels`, `.tokenizer` and `.logits(texts, pairs=None)` -> float32 [N, C] (C = classes, 1 for
regression) in input order. Decoders (hf, merged, peft, run dir) load as `DecoderExported`: `.model` for
generation and `.next_token_logits(texts)` -> [N, vocab]; they have no `.logits`, so a caller can tell them apart.
One call at a time per object; it batches internally (length-sorted, so little padding).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifacts import EXPORT_META, read_export_meta  # noqa: F401  (re-exported)
from ..errors import ExportError

ONNX_FILE = "model.onnx"
FORMATS = ("hf", "merged", "peft", "int8", "onnx")


class Exported:
    """Texts -> logits, whatever runs the model. Subclasses implement `_forward(enc) -> np.ndarray [B, C]`."""

    batch_size = 32

    def __init__(self, meta: dict, tokenizer):
        self.meta, self.tokenizer = meta, tokenizer
        self.task = meta["task"]
        self.labels = meta.get("labels")
        self.max_length = meta.get("max_length") or 512
        self.format = meta.get("format", "run")
        self.heads = None  # a multitask model: every head's logits side by side, `logits(..., task=NAME)` picks one
        if self.task == "multitask":
            from ..models.multihead import columns
            from ..tasks.multitask import Head

            self.heads = [Head.from_json(h) for h in meta["labels"]]
            self.columns = columns(self.heads)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """The training tokenization: longest-first truncation to max_length, padded to the batch's longest."""
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}

    def logits(self, texts: list[str], pairs: list[str] | None = None, task: str | None = None) -> np.ndarray:
        if self.heads is not None and task is not None:
            return self.logits(texts, pairs)[:, self.columns[task]]
        texts = list(texts)
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        size = lambda i: len(texts[i]) + (len(pairs[i]) if pairs is not None else 0)  # noqa: E731
        order = sorted(range(len(texts)), key=size, reverse=True)
        out = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            part = self._forward(self.encode([texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None))
            if out is None:
                out = np.empty((len(texts), part.shape[1]), np.float32)
            out[idx] = part
        if out is None:  # no texts
            width = (max(c.stop for c in self.columns.values()) if self.heads else
                     1 if self.task == "regression" else len(self.labels or [0]))
            out = np.zeros((0, width), np.float32)
        return out

    def _forward(self, enc: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class TorchExported(Exported):
    def __init__(self, meta, tokenizer, model):
        super().__init__(meta, tokenizer)
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def _forward(self, enc):
        import contextlib

        from ..models.multihead import ALL, active_head

        batch = {k: torch.from_numpy(v).to(self.device) for k, v in enc.items()}
        with active_head(self.model, ALL) if self.heads else contextlib.nullcontext():
            return self.model(**batch).logits.float().cpu().numpy()


class OrtExported(Exported):
    """An ONNX graph (fp32 or int8) in onnxruntime's CPU provider."""

    def __init__(self, meta, tokenizer, session):
        super().__init__(meta, tokenizer)
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def _forward(self, enc):
        shape = enc["input_ids"].shape
        feed = {n: enc[n] if n in enc else np.zeros(shape, np.int64) for n in self.inputs}  # e.g. token_type_ids
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


class DecoderExported:
    """A causal LM: `.model` generates (serve, `sftlab generate`); `.next_token_logits` scores the next token."""

    def __init__(self, meta, tokenizer, model):
        self.meta, self.tokenizer, self.model = meta, tokenizer, model.eval()
        self.task, self.labels, self.format = "causal_lm", None, meta.get("format", "run")

    @torch.inference_mode()
    def next_token_logits(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt").to(next(self.model.parameters()).device)
        logits = self.model(**enc).logits.float()
        mask = enc["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last real token, whichever side pads
        return logits[torch.arange(len(last)), last].cpu().numpy()


def ort_session(path: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(f"{path.parent}: an ONNX export needs onnxruntime: pip install 'sftlab[export]'") from None

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()  # same thread count as torch, for fair figures
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def load_exported(path: str | Path, *, threads: int | None = None, device=None):
    """An `Exported` (or `DecoderExported`) for an export folder of any format, or for a run directory."""
    from transformers import AutoTokenizer

    from ..eval.evaluate import adapter_base, load_trained, loading

    p = Path(path)
    meta = read_export_meta(p)
    if meta is None:  # a run directory (or its best/): RunDirError when it is neither
        model, tokenizer, run_meta = load_trained(p, device=device)
        meta = run_meta | {"format": "run"}
    else:
        fmt = meta.get("format")
        if fmt not in FORMATS:
            raise ExportError(f"{p / EXPORT_META}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        with loading(p):
            tokenizer = AutoTokenizer.from_pretrained(p)
            if fmt in ("onnx", "int8"):
                return OrtExported(meta, tokenizer, ort_session(p / ONNX_FILE, threads))
            from ..tasks import task_spec

            auto = task_spec(meta["task"]).auto_model()
            if fmt == "peft":
                from peft import PeftModel

                from ..models.load import peft_calls

                with peft_calls():
                    model = PeftModel.from_pretrained(adapter_base(auto, meta), p)
            else:
                model = auto.from_pretrained(p)
                if meta["task"] == "multitask":  # the heads behind their switch, from the folder's weights
                    from ..eval.evaluate import _heads
                    from ..models.multihead import install_heads

                    install_heads(model, _heads(meta), p)
                elif meta["task"] in ("classification", "regression"):  # mean pooling, as config.json says
                    from ..models.pooling import apply_pooling

                    apply_pooling(model)
        model.to(device or "cpu")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if meta["task"] == "causal_lm":
        return DecoderExported(meta, tokenizer, model)
    return TorchExported(meta, tokenizer, model)

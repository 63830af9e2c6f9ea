"""Packaged models shipped as a split zip (mpnet-base): the pieces read as one stream, unpacked once into the cache
(atomic, locked, reused), and a missing package is one line with the install command. The real teacher is loaded
in tests/integration/test_teacher.py."""
from __future__ import annotations

import importlib.metadata as md
import io
import zipfile
from pathlib import Path

import pytest

from sftlab.errors import ConfigError
from sftlab.models import zipped


def split_zip(folder: Path, out: Path, inner: str, parts: int = 3) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{inner}/{f.name}")
        z.writestr(f"{inner}/desktop.ini", "noise")
    data = buf.getvalue()
    cut = [len(data) * k // parts for k in range(parts + 1)]
    out.mkdir()
    paths = []
    for k in range(parts):
        p = out / f"model.zip.{k + 1:03d}"
        p.write_bytes(data[cut[k]: cut[k + 1]])
        paths.append(p)
    return paths


@pytest.fixture
def fake(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    parts = split_zip(tiny_model_dir, tmp_path / "pieces", "all-mpnet-base-v2")
    monkeypatch.setattr(zipped, "pieces", lambda name: parts)
    return parts


def test_joined_stream_reads_like_the_concatenated_file(fake):
    whole = b"".join(p.read_bytes() for p in fake)
    with zipped.Joined(fake) as j:
        assert j.read() == whole
        j.seek(len(whole) - 10)
        assert j.read(4) == whole[-10:-6]
        j.seek(-3, 2)
        assert j.read() == whole[-3:]


def test_unpacks_once_and_loads(fake, capsys):
    from transformers import AutoTokenizer

    from sftlab.models import resolve_model

    path = Path(resolve_model("mpnet-base"))
    assert "unpacking mpnet-base" in capsys.readouterr().err
    names = {p.name for p in path.iterdir()}
    assert {"COMPLETE", "config.json", "model.safetensors", "tokenizer.json"} <= names and "desktop.ini" not in names
    assert AutoTokenizer.from_pretrained(path)("a fine film")["input_ids"]
    assert resolve_model("mpnet-base") == str(path) and capsys.readouterr().err == ""  # reused, not unpacked again
    assert not list(path.parent.glob("*.tmp-*"))


def test_a_zip_without_the_model_files_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("no model here")
    parts = split_zip(tmp_path / "m", tmp_path / "pieces", "all-mpnet-base-v2", parts=2)
    monkeypatch.setattr(zipped, "pieces", lambda name: parts)
    with pytest.raises(ConfigError, match="the zip lacks"):
        zipped.zipped_path("mpnet-base")
    assert not list((tmp_path / "cache" / "models").glob("mpnet-base-*/COMPLETE"))


def test_missing_package_names_the_install_command(monkeypatch):
    def nothing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(zipped.md, "distribution", nothing)
    with pytest.raises(ConfigError, match=r"pip install 'sftlab\[teacher\]'"):
        zipped.pieces("mpnet-base")

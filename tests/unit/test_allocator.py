"""Training verbs re-execute under jemalloc once, where it exists; everything else, and in-process calls, never do."""
from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

import sftlab.allocator as allocator


@pytest.fixture
def execs(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    for key in ("SFTLAB_ALLOCATOR", "LD_PRELOAD", "MALLOC_CONF", allocator._MARK):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_training_verbs_reexec_once_with_preload_and_our_decay(execs):
    allocator.reexec_under_jemalloc(["train", "cfg.yaml", "train.lr=1e-4"])
    (exe, args, env), = execs
    assert exe == sys.executable and args == [sys.executable, "-m", "sftlab", "train", "cfg.yaml", "train.lr=1e-4"]
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["MALLOC_CONF"] == allocator.CONF
    assert env[allocator._MARK] == "1"  # the new process does not re-execute again


@pytest.mark.parametrize("argv,env", [
    (["eval", "run"], {}), (["serve", "x"], {}), ([], {}),
    (["train", "c"], {"SFTLAB_ALLOCATOR": "system"}),
    (["train", "c"], {allocator._MARK: "1"}),
    (["train", "c"], {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}),
])
def test_nothing_else_reexecs(execs, monkeypatch, argv, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    allocator.reexec_under_jemalloc(argv)
    assert execs == []


def test_user_malloc_conf_is_kept_and_missing_library_is_only_a_note(execs, monkeypatch, capsys):
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")
    allocator.reexec_under_jemalloc(["compare", "c"])
    assert execs[-1][2]["MALLOC_CONF"] == "narenas:1"
    execs.clear()
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setenv("SFTLAB_ALLOCATOR", "jemalloc")
    allocator.reexec_under_jemalloc(["train", "c"])
    assert execs == [] and "no libjemalloc found" in capsys.readouterr().err


@pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None, reason="no libjemalloc on this machine")
def test_cli_training_runs_under_jemalloc_and_says_so(tiny_overrides, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SFTLAB_ALLOCATOR", "LD_PRELOAD", allocator._MARK)}
    proc = subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *tiny_overrides, "train.max_steps=2",
                           "train.tensorboard=false"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = proc.stdout.strip().splitlines()[-1]
    assert json.loads(open(os.path.join(run_dir, "summary.json")).read())["allocator"] == "jemalloc"

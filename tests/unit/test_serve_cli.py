"""`sftlab serve DIR`: what DIR may be (export formats, run directory, anything else -> one line), settings
validation, and the real server in a subprocess: ready line, /health, classify, clean exit on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from sftlab.cli import main
from sftlab.errors import SftlabError
from sftlab.serve import create_app, make_settings
from sftlab.serve.backend import load_backend
from tests.unit.test_serve import LABELS, export_folder

REPO = Path(__file__).resolve().parents[2]


def test_runtime_formats_go_through_load_exported(tmp_path, monkeypatch):
    """onnx / int8 folders are loaded by sftlab.export.runtime.load_exported (imported only then)."""
    seen = []

    class Exported:
        meta = {"task": "classification", "labels": ["no", "yes"], "format": "onnx"}
        task, labels, tokenizer = "classification", ["no", "yes"], None

        def logits(self, texts, pairs=None):
            return np.array([[0.0, float(len(t))] for t in texts], dtype=np.float32)

    def load_exported(path, **kw):
        seen.append(Path(path))
        return Exported()

    runtime = types.ModuleType("sftlab.export.runtime")
    runtime.load_exported = load_exported
    monkeypatch.setitem(sys.modules, "sftlab.export", types.ModuleType("sftlab.export"))
    monkeypatch.setitem(sys.modules, "sftlab.export.runtime", runtime)
    (tmp_path / "sftlab_export.json").write_text(json.dumps({"format": "onnx", **Exported.meta}))
    with TestClient(create_app(tmp_path)) as c:
        preds = c.post("/v1/classify", json={"texts": ["", "abc"]}).json()["predictions"]
    assert seen == [tmp_path]
    assert preds[0] == {"label": "no", "score": 0.5}
    assert preds[1]["label"] == "yes" and preds[1]["score"] == pytest.approx(1 / (1 + np.exp(-3)), abs=1e-6)


@pytest.mark.parametrize("setup,message", [
    (None, "no such directory"),
    ({}, "nothing to serve here"),
    ({"sftlab_export.json": "{not json"}, "unreadable"),
    ({"sftlab_export.json": json.dumps({"format": "hf", "task": "ranking"})}, "'task' must be one of"),
    ({"sftlab_export.json": json.dumps({"format": "hf", "task": "classification"})}, "needs its 'labels'"),
    ({"sftlab_export.json": json.dumps({"format": "tflite", "task": "regression"})}, "unknown format 'tflite'"),
    ({"sftlab_export.json": json.dumps({"format": "hf", "task": "regression"})}, "the saved model does not load"),
])
def test_unservable_folder_is_one_line_error(tmp_path, capsys, setup, message):
    target = tmp_path / "x"
    if setup is not None:
        target.mkdir()
        for name, text in setup.items():
            (target / name).write_text(text)
    with pytest.raises(SftlabError, match=re.escape(message)):
        load_backend(target)
    assert main(["serve", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sftlab: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("kw,message", [
    ({"port": 70000}, "--port"), ({"max_batch_size": 0}, "--max-batch-size"), ({"token": "has space"}, "--token"),
    ({"max_texts": 10, "max_queue": 5}, "could never be queued"), ({"timeout_s": -1}, "--timeout-s")])
def test_settings_are_validated(kw, message):
    with pytest.raises(SftlabError, match=re.escape(message)):
        make_settings(**kw)


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("SFTLAB_SERVE_TOKEN", "from-env")
    assert make_settings().token == "from-env" and make_settings(token="flag").token == "flag"


def test_serve_subprocess_ready_classify_sigterm(tiny_model_dir, tmp_path):
    folder = export_folder(tiny_model_dir, tmp_path / "export")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SFTLAB_SERVE_TOKEN": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sftlab", "serve", str(folder), "--port", "0", "--token", "tok"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url, t0 = None, time.time()
        while url is None and time.time() - t0 < 60:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}")
            if m := re.search(r"ready on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "no ready line within 60 s"
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert json.load(r) == {"status": "ok", "task": "classification"}
        req = urllib.request.Request(url + "/v1/classify", data=json.dumps({"texts": ["great", "awful"]}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer tok"})
        with urllib.request.urlopen(req, timeout=10) as r:
            preds = json.load(r)["predictions"]
        assert len(preds) == 2 and all(p["label"] in LABELS and 0 <= p["score"] <= 1 for p in preds)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_imports_nothing_from_train(tiny_model_dir, tmp_path):
    """DESIGN: serve/ imports nothing from sftlab.train, also when it loads a run directory (load_trained)."""
    import shutil

    best = tmp_path / "run" / "best"
    shutil.copytree(export_folder(tiny_model_dir, tmp_path / "export"), best)
    (best / "sftlab.json").write_text(json.dumps({"task": "classification", "labels": LABELS, "max_length": 16}))
    code = ("import sys; from sftlab.serve import create_app; create_app(sys.argv[1]); "
            "bad = sorted(m for m in sys.modules if m.startswith('sftlab.train')); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

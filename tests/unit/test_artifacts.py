"""artifacts.ModelDir: one answer to "what is this folder?" for eval, generation, serving, export and the teacher."""
from __future__ import annotations

import json

import pytest

from sftlab.artifacts import ModelDir, find_model_dir, run_dir_of
from sftlab.errors import ExportError, RunDirError


def fake_run(root):
    (root / "best").mkdir(parents=True)
    (root / "config.yaml").write_text("task: classification\n")
    (root / "best" / "sftlab.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"]}))
    return root


def test_kinds(tmp_path):
    run = fake_run(tmp_path / "run")
    md = ModelDir.open(run)
    assert (md.kind, md.model_dir, md.run_dir, md.task) == ("run", run / "best", run, "classification")
    best = ModelDir.open(run / "best")
    assert (best.kind, best.model_dir, best.run_dir) == ("model", run / "best", run)
    export = tmp_path / "exp"
    export.mkdir()
    (export / "sftlab_export.json").write_text(json.dumps({"format": "hf", "task": "regression"}))
    ex = ModelDir.open(export)
    assert (ex.kind, ex.task, ex.run_dir) == ("export", "regression", None)
    base = ModelDir.open("minilm-l6")
    assert (base.kind, base.meta, base.trained) == ("base", None, False)
    assert find_model_dir(run) == run / "best" and run_dir_of(run / "best") == run


def test_broken_descriptions_are_one_line_errors(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "best" / "sftlab.json").write_text("{trunc")
    with pytest.raises(RunDirError, match="unreadable"):
        ModelDir.open(run).meta
    (run / "best" / "sftlab.json").write_text(json.dumps({"task": "poetry"}))
    with pytest.raises(RunDirError, match="'task' must be one of"):
        ModelDir.open(run).meta
    export = tmp_path / "exp"
    export.mkdir()
    (export / "sftlab_export.json").write_text("[]")
    with pytest.raises(ExportError, match="not an sftlab export description"):
        ModelDir.open(export).meta
    with pytest.raises(RunDirError, match="no trained model here"):
        find_model_dir(tmp_path)

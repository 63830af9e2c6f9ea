"""The training-objective matrix: every registered objective has a row here, and at its neutral setting it trains
exactly what plain SFT trains (bitwise) while logging its loss parts. Technique-specific equations live in the
objective's own test file (test_distill.py, test_domain_adapt.py, test_gan_bert.py, ...)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sftlab.train.loop as loop
from sftlab.config import load_config
from sftlab.registry import training_objectives
from tests.conftest import make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

# objective -> (overrides at its neutral setting, {teacher} filled in; the loss parts it must log)
MATRIX = {
    "sft": ([], set()),
    "distill": (["objective.teacher={teacher}", "objective.alpha=0", "objective.temperature=1"], {"hard", "soft"}),
    "mmd": (["objective.weight=0", "data.unlabelled={target}"], {"task"}),
    "dann": (["objective.weight=0", "data.unlabelled={target}"], {"task"}),
    "udalm": (["objective.weight=0", "data.unlabelled={target}"], {"task"}),
    "simcse": None,  # trains task embedding only, which has no SFT to equal (its equations: test_embedding.py)
    # no neutral setting: the pair loss and the GAN's terms are the technique (equations and resume:
    # test_contrastive_pairs.py, test_gan_bert.py)
    "contrastive_pairs": None,
    "gan_bert": None,
}


def test_every_objective_has_a_row():
    import sftlab.objectives  # noqa: F401  (registers)

    assert set(MATRIX) == set(training_objectives.names())


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    data = write_jsonl(root / "train.jsonl", make_rows(32))
    base = [f"model.name={tiny_model_dir}", f"data.train={data}", f"data.dev={data}", "train.batch_size=8",
            "train.lr=1e-3", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
            "train.log_every=1", "train.max_steps=4"]
    teacher = loop.train(load_config(None, base + [f"output_dir={root / 'teacher'}"]))
    sft = loop.train(load_config(None, base + [f"output_dir={root / 'sft'}"]))
    target = write_jsonl(root / "target.jsonl", make_rows(16, seed=3))
    return {"base": base, "teacher": str(teacher), "sft": sft, "target": str(target)}


@pytest.mark.parametrize("name", sorted(k for k, v in MATRIX.items() if v is not None))
def test_neutral_setting_is_plain_sft_and_parts_are_logged(name, world, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    extra, parts = MATRIX[name]
    over = [f"objective.name={name}"] + [e.format(teacher=world["teacher"], target=world["target"]) for e in extra]
    run = loop.train(load_config(None, world["base"] + over + [f"output_dir={tmp_path / 'run'}"]))
    a = load_file(str(world["sft"] / "best" / "model.safetensors"))
    b = load_file(str(run / "best" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]
    assert all({f"loss/{p}" for p in parts} <= set(r) for r in logged)

"""Intermediate-layer distillation (issue 16; objectives/internals.py) as equations on the tiny BERTs:
identical models with the identity layer map give zero attention and hidden loss; the parts add up to the loss;
a projection is trained when widths differ and travels in checkpoints (resume mid-run == uninterrupted, bitwise);
teachers with another tokenizer or head count, bad layer maps and decoders are one line each."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sftlab.train.loop as loop
from sftlab.cli import main
from sftlab.config import load_config
from tests.conftest import crash_after_checkpoint, make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def world(tiny_model_dir, wide_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("internals")
    train = write_jsonl(root / "train.jsonl", make_rows(48))
    dev = write_jsonl(root / "dev.jsonl", make_rows(16, seed=1))
    base = [f"data.train={train}", f"data.dev={dev}", "train.batch_size=8", "train.lr=1e-3",
            "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.log_every=1"]
    teachers = {}
    for name, model in (("same", tiny_model_dir), ("wide", wide_model_dir)):
        cfg = load_config(None, base + [f"model.name={model}", "train.max_steps=8", f"output_dir={root / name}"])
        teachers[name] = str(loop.train(cfg))
    return {"base": base + [f"model.name={tiny_model_dir}"], "teachers": teachers, "root": root}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def run(world, out, *extra, resume=None):
    cfg = load_config(None, world["base"] + ["train.max_steps=6", "train.eval_every=3", *extra, f"output_dir={out}"])
    return loop.train(cfg, resume=resume)


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]


def distill(world, teacher="same", *more):
    return ["objective.name=distill", f"objective.teacher={world['teachers'][teacher]}", *more]


def test_identical_models_with_the_identity_map_give_zero_attention_and_hidden_loss(world, tmp_path):
    student = [f"model.name={world['teachers']['same']}/best"]
    kd = run(world, tmp_path / "kd", *student, "train.max_steps=1", *distill(
        world, "same", "objective.alpha=1", "objective.attention_weight=1", "objective.hidden_weight=1",
        "objective.layer_map=[0,1]"))
    first = records(kd)[0]
    assert first["loss/attention"] == pytest.approx(0, abs=1e-7) and first["loss/hidden"] == pytest.approx(0, abs=1e-7)
    assert first["loss"] == pytest.approx(0, abs=1e-6)
    assert not list((kd / "checkpoints").glob("*/extras.safetensors"))  # same width: no projection


def test_the_parts_add_up_to_the_loss(world, tmp_path):
    kd = run(world, tmp_path / "kd", *distill(world, "same", "objective.alpha=0.4", "objective.attention_weight=2",
                                              "objective.hidden_weight=0.5"))
    for r in records(kd):
        assert r["loss/attention"] > 0 and r["loss/hidden"] > 0
        want = 0.6 * r["loss/hard"] + 0.4 * r["loss/soft"] + 2 * r["loss/attention"] + 0.5 * r["loss/hidden"]
        assert r["loss"] == pytest.approx(want, rel=1e-5)


def test_a_wider_teacher_trains_a_projection_that_resumes_bitwise(world, tmp_path, monkeypatch):
    args = distill(world, "wide", "objective.attention_weight=1", "objective.hidden_weight=1")
    ref = run(world, tmp_path / "ref", *args)
    real = crash_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "part", *args)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    part = run(world, tmp_path / "part", *args, resume=tmp_path / "part")
    for name in ("model", "extras"):
        a, b = (load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / f"{name}.safetensors"))
                for d in (ref, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    proj = load_file(str(sorted((ref / "checkpoints").glob("step-*"))[-1] / "extras.safetensors"))
    assert proj["hidden_proj.weight"].shape == (48, 32)
    assert "hidden_proj" not in json.dumps(list(load_file(str(ref / "best" / "model.safetensors"))))
    assert records(ref)[-1] == records(part)[-1] | {"examples_per_s": records(ref)[-1]["examples_per_s"]}


def test_a_shallower_student_takes_the_uniform_layer_map(world, tmp_path):
    kd = run(world, tmp_path / "kd", "model.keep_layers=[1]", *distill(world, "same", "objective.hidden_weight=1",
                                                                       "objective.attention_weight=1"))
    assert records(kd)[-1]["loss/hidden"] > 0  # student layer 0 <- teacher layer 1 (auto)


def one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sftlab: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.fixture(scope="module")
def other_tokenizer_teacher(world):
    """An encoder classifier of the same labels whose tokenizer has another vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = world["root"] / "other-tok"
    out.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "was", "good", "bad"]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, id2label={0: "negative", 1: "positive"},
                     label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("extra,words", [
    (["objective.attention_weight=-1"], "objective.attention_weight must be >= 0"),
    (["objective.hidden_weight=1", "objective.layer_map=[0,5]"], "one teacher layer in [0, 1] for each"),
    (["objective.hidden_weight=1", "model.keep_layers=[0]", "objective.layer_map=[0,1]"], "student's 1 layers"),
])
def test_bad_options_are_one_line(world, extra, words, capsys, tmp_path):
    msg = one_line(capsys, ["train", "-", *world["base"], *distill(world), *extra, f"output_dir={tmp_path / 'x'}"])
    assert words in msg and not (tmp_path / "x").exists()


def test_another_tokenizer_is_one_line_but_logit_kd_works(world, other_tokenizer_teacher, capsys, tmp_path):
    args = ["objective.name=distill", f"objective.teacher={other_tokenizer_teacher}"]
    msg = one_line(capsys, ["train", "-", *world["base"], *args, "objective.hidden_weight=1", "train.max_steps=2",
                            f"output_dir={tmp_path / 'x'}"])
    assert "another tokenizer" in msg and "logit distillation alone works" in msg
    assert main(["train", "-", *world["base"], *args, "train.max_steps=2", f"output_dir={tmp_path / 'y'}"]) == 0


def test_another_head_count_is_one_line(world, tmp_path, capsys):
    import shutil
    from pathlib import Path

    from transformers import BertConfig, BertModel

    three = tmp_path / "three-heads"
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                         intermediate_size=96, max_position_embeddings=128)).save_pretrained(three)
    for f in (Path(world["teachers"]["same"]) / "best").iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, three / f.name)
    teacher = loop.train(load_config(None, world["base"][:-1] + [f"model.name={three}", "train.max_steps=1",
                                                                   f"output_dir={tmp_path / 't'}"]))
    msg = one_line(capsys, ["train", "-", *world["base"], "objective.name=distill", f"objective.teacher={teacher}",
                            "objective.attention_weight=1", f"output_dir={tmp_path / 'x'}"])
    assert "2 attention heads" in msg and "teacher 3" in msg

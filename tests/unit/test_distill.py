"""`objective.name: distill` through the loop (issue 16), as equations on the tiny BERT:
alpha = 0 == plain SFT (bitwise); cached == live teacher (same weights); a teacher equal to the student gives zero
soft loss; resume mid-run == uninterrupted (bitwise); per-part losses logged; bad input is one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sftlab.train.loop as loop
from sftlab.cli import main
from sftlab.config import load_config
from tests.conftest import crash_after_checkpoint, make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    train = write_jsonl(root / "train.jsonl", make_rows(48))
    dev = write_jsonl(root / "dev.jsonl", make_rows(16, seed=1))
    base = [f"model.name={tiny_model_dir}", f"data.train={train}", f"data.dev={dev}", "train.batch_size=8",
            "train.lr=1e-3", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
            "train.log_every=1"]
    teacher = loop.train(load_config(None, base + ["train.max_steps=8", f"output_dir={root / 'teacher'}"]))
    return {"root": root, "base": base, "teacher": str(teacher), "train": str(train)}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def run(world, out, *extra, resume=None):
    cfg = load_config(None, world["base"] + ["train.max_steps=6", "train.eval_every=3", *extra, f"output_dir={out}"])
    return loop.train(cfg, resume=resume)


def weights(run_dir):
    return load_file(str(run_dir / "best" / "model.safetensors"))


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]


def distill(world, *more):
    return ["objective.name=distill", f"objective.teacher={world['teacher']}", *more]


def test_alpha_zero_is_plain_sft_bitwise(world, tmp_path):
    sft = run(world, tmp_path / "sft")
    kd = run(world, tmp_path / "kd", *distill(world, "objective.alpha=0", "objective.temperature=1"))
    a, b = weights(sft), weights(kd)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(sft)] == [r["loss"] for r in records(kd)]


def test_parts_are_logged_and_mix_into_the_loss(world, tmp_path):
    kd = run(world, tmp_path / "kd", *distill(world, "objective.alpha=0.3", "objective.temperature=2"))
    for r in records(kd):
        assert r["loss"] == pytest.approx(0.7 * r["loss/hard"] + 0.3 * r["loss/soft"], rel=1e-5)
        assert r["loss/soft"] >= 0
    sft = run(world, tmp_path / "sft")  # and the soft term does move the student
    a, b = weights(sft), weights(kd)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_cached_equals_live_teacher(world, tmp_path):
    cached = run(world, tmp_path / "cached", *distill(world))
    again = run(world, tmp_path / "again", *distill(world))  # from the cache built by the first run
    live = run(world, tmp_path / "live", *distill(world, "objective.cache=false"))
    a, b, c = weights(cached), weights(again), weights(live)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_a_teacher_equal_to_the_student_gives_zero_soft_loss(world, tmp_path):
    """The student starts as the teacher (its best/ as model.name; the tiny BERT has no dropout): step 1's soft
    loss is zero, and it is the same model, so a pure-soft run (alpha = 1) barely moves it."""
    student = [f"model.name={world['teacher']}/best"]
    kd = run(world, tmp_path / "kd", *student, *distill(world, "objective.alpha=1"), "train.max_steps=1")
    first = records(kd)[0]
    assert first["loss/soft"] == pytest.approx(0.0, abs=1e-6) and first["loss"] == pytest.approx(0.0, abs=1e-6)


def test_resume_mid_run_equals_uninterrupted(world, tmp_path, monkeypatch):
    args = distill(world, "objective.alpha=0.5")
    ref = run(world, tmp_path / "ref", *args)
    real = crash_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "part", *args)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    part = run(world, tmp_path / "part", *args, resume=tmp_path / "part")
    a, b = weights(ref), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(ref)[-1] == records(part)[-1] | {"examples_per_s": records(ref)[-1]["examples_per_s"]}


def one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sftlab: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("extra,words", [
    (["objective.temperature=0"], "objective.temperature must be > 0"),
    (["objective.alpha=1.5"], "objective.alpha must be in [0, 1]"),
    (["objective.temperatur=2"], "did you mean objective.temperature?"),
    (["objective.hidden_weight=-0.5"], "objective.hidden_weight must be >= 0"),
])
def test_bad_options_are_one_line(world, extra, words, capsys, tmp_path):
    msg = one_line(capsys, ["train", "-", *world["base"], *distill(world), *extra, f"output_dir={tmp_path / 'x'}"])
    assert words in msg and not (tmp_path / "x").exists()


def test_missing_teacher_and_other_labels_are_one_line(world, capsys, tmp_path):
    msg = one_line(capsys, ["train", "-", *world["base"], "objective.name=distill",
                            f"objective.teacher={tmp_path / 'nope'}", f"output_dir={tmp_path / 'a'}"])
    assert "holds no trained model" in msg
    other = write_jsonl(tmp_path / "other.jsonl", make_rows(16, labels=("bad", "good")))
    msg = one_line(capsys, ["train", "-", *world["base"], f"data.train={other}", f"data.dev={other}",
                            *distill(world), f"output_dir={tmp_path / 'b'}"])
    assert "same label set" in msg


def test_a_changed_teacher_is_refused_on_resume(world, tmp_path, capsys, monkeypatch):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(world["teacher"], teacher)
    args = ["objective.name=distill", f"objective.teacher={teacher}"]
    real = crash_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "part", *args)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    w = teacher / "best" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    over = world["base"] + ["train.max_steps=6", "train.eval_every=3", *args]
    msg = one_line(capsys, ["train", "-", *over, "--resume", str(tmp_path / "part")])
    assert "teacher changed since this run started" in msg


def test_report_shows_the_loss_parts(world, tmp_path, capsys):
    kd = run(world, tmp_path / "kd", *distill(world))
    sft = run(world, tmp_path / "sft")
    out = tmp_path / "r.html"
    assert main(["report", str(kd), str(sft), "--out", str(out), "--no-eval"]) == 0
    html = out.read_text()
    assert "loss parts over steps" in html and "name=distill" in html and "alpha=0.5" in html
    out2 = tmp_path / "s.html"
    assert main(["report", str(sft), "--out", str(out2), "--no-eval"]) == 0
    assert "loss parts" not in out2.read_text()  # plain SFT has no parts: no empty panel, no note


# ------------------------------------------------------------------------------------------------ decoders

@pytest.fixture(scope="module")
def chat_world(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import make_chats

    root = tmp_path_factory.mktemp("distill-lm")
    data = write_jsonl(root / "chats.jsonl", make_chats(24))
    base = [f"model.name={tiny_llama_dir}", "task=causal_lm", f"data.train={data}", "data.max_length=64",
            "train.batch_size=4", "train.lr=1e-3", "train.precision=fp32", "train.progress=false",
            "train.tensorboard=false", "train.log_every=1"]
    teacher = loop.train(load_config(None, base + ["train.max_steps=6", f"output_dir={root / 'teacher'}"]))
    return {"base": base, "teacher": str(teacher)}


def lm_run(world, out, *extra):
    return loop.train(load_config(None, world["base"] + ["train.max_steps=4", *extra, f"output_dir={out}"]))


def test_decoder_alpha_zero_is_plain_sft_bitwise(chat_world, tmp_path):
    sft = lm_run(chat_world, tmp_path / "sft")
    kd = lm_run(chat_world, tmp_path / "kd", *distill(chat_world, "objective.alpha=0", "objective.temperature=1"))
    a, b = weights(sft), weights(kd)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("loss/soft" in r for r in records(kd))


def test_decoder_teacher_equal_to_student_gives_zero_soft_loss(chat_world, tmp_path):
    kd = lm_run(chat_world, tmp_path / "kd", f"model.name={chat_world['teacher']}/best",
                *distill(chat_world, "objective.alpha=0.5", "objective.top_k=8"), "train.max_steps=1")
    assert records(kd)[0]["loss/soft"] == pytest.approx(0.0, abs=1e-5)


def test_half_depth_decoder_student_distils_and_generates(chat_world, tmp_path, capsys):
    kd = lm_run(chat_world, tmp_path / "kd", "model.keep_layers=[1]", *distill(chat_world, "objective.alpha=0.5"))
    assert records(kd)[-1]["loss/soft"] > 0
    assert main(["generate", str(kd), "--prompt", "hello there", "--max-new-tokens", "3"]) == 0


def test_decoder_teacher_with_another_vocabulary_is_one_line(chat_world, tiny_model_dir, capsys, tmp_path):
    msg = one_line(capsys, ["train", "-", *chat_world["base"], "objective.name=distill",
                            f"objective.teacher={tiny_model_dir}", f"output_dir={tmp_path / 'x'}"])
    assert "objective.teacher" in msg


def test_baselines_of_a_distilled_run_add_the_teacher_and_the_no_kd_student(world, tmp_path, capsys):
    from sftlab.eval.baselines import run_baselines

    kd = run(world, tmp_path / "kd", *distill(world))
    dev = [o for o in world["base"] if o.startswith("data.dev=")][0].split("=", 1)[1]
    rows = run_baselines(str(kd), dev, bf16=False)
    assert {"fine_tuned", "majority", "from_scratch", "teacher", "no_kd"} <= set(rows)
    for name in ("fine_tuned", "teacher", "no_kd"):
        r = rows[name]
        assert r["params"] > 0 and r["ms_per_row_batch1"] > 0 and r["rows_per_s_batch32"] > 0 and "accuracy" in r
    twin = tmp_path / "kd" / "baselines" / "no_kd"
    import yaml

    assert yaml.safe_load((twin / "config.yaml").read_text())["objective"] == {"name": "sft"}
    stamp = (twin / "summary.json").stat().st_mtime_ns
    run_baselines(str(kd), dev, bf16=False)  # trained once, reused
    assert (twin / "summary.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------- unlabelled stream

def unlabelled_file(tmp_path, n=20):
    rows = [{"text": r["text"] + " indeed"} for r in make_rows(n, seed=7)]
    return write_jsonl(tmp_path / "unlabelled.jsonl", rows)


def test_unlabelled_rows_are_distilled_as_a_second_stream(world, tmp_path):
    u = unlabelled_file(tmp_path)
    kd = run(world, tmp_path / "kd", *distill(world), f"data.unlabelled={u}")
    recs = records(kd)
    assert all(r["loss/soft_unlabelled"] >= 0 for r in recs)
    for r in recs:
        assert r["loss"] == pytest.approx(0.5 * r["loss/hard"] + 0.5 * r["loss/soft"] + 0.5 * r["loss/soft_unlabelled"],
                                          rel=1e-5)
    summary = json.loads((kd / "summary.json").read_text())
    assert summary["examples"] == 6 * 8 and summary["data"]["unlabelled"]["rows"] == 20  # labelled rows counted


def test_resume_with_the_unlabelled_stream_in_another_epoch_equals_uninterrupted(world, tmp_path, monkeypatch):
    """48 labelled rows (6 steps an epoch) and 20 unlabelled (3 steps an epoch): at the step-4 checkpoint the
    labelled stream is in epoch 0 and the unlabelled one in epoch 1."""
    u = unlabelled_file(tmp_path)
    args = [*distill(world), f"data.unlabelled={u}", "train.max_steps=8", "train.eval_every=4"]
    ref = run(world, tmp_path / "ref", *args)
    real = crash_after_checkpoint(monkeypatch, step=4)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "part", *args)
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["epoch"] == 0 and state["streams"]["unlabelled"] == [1, 1]
    monkeypatch.setattr(loop, "save_checkpoint", real)
    run(world, tmp_path / "part", *args, resume=tmp_path / "part")
    a, b = weights(ref), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_regression_distills_unlabelled_rows_from_several_files(world, tmp_path):
    """Regression: soft = squared distance to the teacher's prediction; unlabelled rows carry NaN targets and add
    nothing to the hard term. Two files read through their own text column, capped by limit_unlabelled."""
    reg = [f"data.train={write_jsonl(tmp_path / 'reg.jsonl', [dict(r, label=2.5 * (r['label'] == 'positive')) for r in make_rows(48)])}",
           "data.dev=null", "task=regression"]
    teacher = run(world, tmp_path / "teacher", *reg)
    files = [write_jsonl(tmp_path / f"u{i}.jsonl", [{"body": r["text"], "label": "?"} for r in make_rows(20, seed=i)])
             for i in (7, 8)]
    kd = run(world, tmp_path / "kd", *reg, "objective.name=distill", f"objective.teacher={teacher}",
             f"data.unlabelled=[{files[0]},{files[1]}]", "data.unlabelled_text=body", "data.limit_unlabelled=25")
    recs = records(kd)
    for r in recs:
        assert r["loss"] == pytest.approx(0.5 * r["loss/hard"] + 0.5 * r["loss/soft"] + 0.5 * r["loss/soft_unlabelled"],
                                          rel=1e-5)
        assert r["loss/soft_unlabelled"] > 0 and r["loss/hard"] == r["loss/hard"]  # finite: NaN targets left out
    info = json.loads((kd / "summary.json").read_text())["data"]["unlabelled"]
    assert info["rows"] == 25 and "u7.jsonl + " in info["source"]


def test_unlabelled_misuse_is_one_line(world, tmp_path, capsys):
    u = unlabelled_file(tmp_path)
    msg = one_line(capsys, ["train", "-", *world["base"], f"data.unlabelled={u}", f"output_dir={tmp_path / 'a'}"])
    assert "data.unlabelled" in msg and "objective.name=distill" in msg
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"sentence": "no text column here"}] * 3)
    msg = one_line(capsys, ["train", "-", *world["base"], *distill(world), f"data.unlabelled={bad}",
                            f"output_dir={tmp_path / 'b'}"])
    assert "bad.jsonl" in msg and "no column 'text'" in msg and "data.unlabelled_text" in msg


def test_decoder_baselines_add_the_teacher_and_the_no_kd_student(chat_world, tmp_path):
    """A distilled decoder's --baselines: teacher and no-KD rows next to the fine-tuned one, each with its
    parameters and generated tokens/s; the no-KD twin is trained once and reused."""
    from sftlab.eval.baselines import run_baselines

    kd = lm_run(chat_world, tmp_path / "kd", "model.keep_layers=[1]", *distill(chat_world, "objective.alpha=0.5"))
    data = [o for o in chat_world["base"] if o.startswith("data.train=")][0].split("=", 1)[1]
    rows = run_baselines(str(kd), data, bf16=False, icl_shots=0, limit=4)
    assert {"fine_tuned", "zero_shot", "teacher", "no_kd"} <= set(rows)
    assert rows["teacher"]["params"] > rows["fine_tuned"]["params"] == rows["no_kd"]["params"]
    assert all(rows[n]["gen_tokens_per_s"] >= 0 for n in ("fine_tuned", "teacher", "no_kd"))  # tiny: may stop at once
    assert not (Path(chat_world["teacher"]) / "analysis").exists()  # nothing written into the teacher's run
    twin = tmp_path / "kd" / "baselines" / "no_kd" / "summary.json"
    stamp = twin.stat().st_mtime_ns
    run_baselines(str(kd), data, bf16=False, icl_shots=0, limit=4)
    assert twin.stat().st_mtime_ns == stamp

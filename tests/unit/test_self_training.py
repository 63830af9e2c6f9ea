"""`sftlab self-train` as equations: threshold 1.0 adds nothing so round 1 == round 0 (bitwise); a round's pseudo
file is `sftlab predict` of the previous best model, filtered at the threshold and balanced; resumable."""
from __future__ import annotations

import json
from collections import Counter

from safetensors.torch import load_file

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.data.kshot import labelled_sample
from tests.unit.test_compare import drop_output_dir


def _argv(tiny_overrides, toy_data, out, *extra):
    return ["self-train", "-", *drop_output_dir(tiny_overrides), "train.epochs=1", "data.k_shot=4",
            f"data.unlabelled={toy_data['train']}", "--out", str(out), *extra]


def test_threshold_one_adds_nothing_so_round_one_is_round_zero(tiny_overrides, toy_data, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(_argv(tiny_overrides, toy_data, out, "--rounds", "1", "--threshold", "1.0")) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "round-1")
    assert (out / "round-1" / "pseudo.jsonl").read_text() == ""
    a, b = (load_file(str(out / r / "best" / "model.safetensors")) for r in ("round-0", "round-1"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_contrastive_pairs_rounds_threshold_one_round_one_is_round_zero(tiny_overrides, toy_data, tmp_path, capsys):
    """SetFit + self-training: each round trains the config's objective (pairs, logistic head) as written."""
    out = tmp_path / "st"
    argv = _argv(tiny_overrides, toy_data, out, "--rounds", "1", "--threshold", "1.0",
                 "objective.name=contrastive_pairs", "model.pooling=mean")
    assert main(argv) == 0
    assert "contrastive_pairs" in (out / "round-1" / "config.yaml").read_text()
    a, b = (load_file(str(out / r / "best" / "model.safetensors")) for r in ("round-0", "round-1"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_pseudo_file_is_predict_filtered_and_balanced_then_resume_and_distill(tiny_overrides, toy_data, tmp_path,
                                                                             capsys):
    out = tmp_path / "st"
    argv = _argv(tiny_overrides, toy_data, out, "--rounds", "1", "--threshold", "0.5", "train.epochs=10",
                 "train.lr=5e-3", "train.metric=loss")
    assert main(argv) == 0
    capsys.readouterr()
    labelled = json.loads((out / "round-0" / "summary.json").read_text())["data"]["train"]
    assert labelled["labels"] == {"negative": 4, "positive": 4}
    assert main(["predict", str(out / "round-0"), "--data", toy_data["train"], "--out", str(tmp_path / "p.jsonl")]) == 0
    predicted = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    train_rows = [json.loads(x) for x in (out / "data" / "round-1-train.jsonl").read_text().splitlines()]
    train, _, _ = labelled_sample(load_config(None, drop_output_dir(tiny_overrides) + ["data.k_shot=4"]))
    taken = {e.line for e in train.examples}
    assert [r["text"] for r in train_rows[:8]] == [e.text for e in train.examples]  # round 0's rows come first
    pseudo = [json.loads(x) for x in (out / "round-1" / "pseudo.jsonl").read_text().splitlines()]
    confident = [p for p in predicted if p["score"] >= 0.5 and p["line"] not in taken]
    per = Counter(p["label"] for p in pseudo)
    n = min(Counter(p["label"] for p in confident).get(k, 0) for k in ("negative", "positive"))
    assert pseudo and set(per.values()) == {n}
    for label in ("negative", "positive"):  # the n most confident of each class, rows exactly as predict wrote them
        best = sorted((p for p in confident if p["label"] == label), key=lambda p: (-p["score"], p["line"]))[:n]
        assert sorted(best, key=lambda p: p["line"]) == [p for p in pseudo if p["label"] == label]
    assert [r["label"] for r in train_rows[8:]] == [p["label"] for p in pseudo]
    summary = json.loads((out / "round-1" / "summary.json").read_text())
    assert summary["data"]["train"]["rows"] == 8 + len(pseudo)

    before = (out / "round-1" / "summary.json").stat().st_mtime_ns
    assert main(argv + ["--resume", "--distill"]) == 0  # finished rounds reused, the student added
    assert (out / "round-1" / "summary.json").stat().st_mtime_ns == before
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "distill")
    cfg = (out / "distill" / "config.yaml").read_text()
    assert "name: distill" in cfg and str(out / "round-1" / "best") in cfg


def test_bad_input_is_one_line(tiny_overrides, toy_data, tmp_path, capsys):
    base = _argv(tiny_overrides, toy_data, tmp_path / "x")
    for extra, msg in [(["--rounds", "1", "--threshold", "0"], "--threshold 0.0"),
                       (["--rounds", "1", "--threshold", "1.5"], "--threshold 1.5"),
                       (["--rounds", "0"], "--rounds 0"),
                       (["--rounds", "1", "data.unlabelled=null"], "pseudo-labels data.unlabelled"),
                       (["--rounds", "1", "data.k_shot=40"], "class 'negative' has 32"),
                       (["--rounds", "1", "objective.name=gan_bert"], "objective gan_bert would read it too")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_round_0_from_a_finished_run_is_that_run(tiny_overrides, toy_data, tmp_path, capsys):
    """--round-0 RUN: no round 0 is trained, RUN labels the pool, and round 1 is what it would be had RUN been
    round 0 (bitwise): how issue 17's MMD run labels the target text before self-training."""
    first, second = tmp_path / "st", tmp_path / "st2"
    extra = ("--rounds", "1", "--threshold", "0.5", "train.epochs=3", "train.lr=5e-3")
    assert main(_argv(tiny_overrides, toy_data, first, *extra)) == 0
    assert main(_argv(tiny_overrides, toy_data, second, *extra, "--round-0", str(first / "round-0"))) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(second / "round-1")
    assert not (second / "round-0").exists()
    for f in ("round-1-pseudo.jsonl", "round-1-train.jsonl"):
        assert (second / "data" / f).read_text() == (first / "data" / f).read_text()
    a, b = (load_file(str(d / "round-1" / "best" / "model.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    (second / "round-1" / "labels.json").write_text('["a", "b"]')  # a run with other classes
    for run, msg in [(tmp_path / "nope", "not a finished run"), (second / "round-1", "are not this config's")]:
        assert main(_argv(tiny_overrides, toy_data, tmp_path / "bad", *extra, "--round-0", str(run))) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert not (tmp_path / "bad").exists()

"""Error analysis (`sftlab eval` writes RUN_DIR/analysis/) and baselines (`sftlab eval --baselines`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.eval.analysis import analyse, calibration
from sftlab.train.loop import train
from tests.conftest import make_rows, write_jsonl


def test_analysis_by_hand():
    # 6 examples, 2 classes; logits chosen so probabilities and mistakes are known
    logits = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.95, 0.05]]))
    labels = np.array([0, 1, 1, 0, 0, 0])
    texts = [f"t{i}" for i in range(6)]
    a = analyse("classification", logits, labels, texts, [3, 5, 20, 40, 7, 9], ["neg", "pos"])
    assert a["confusion"]["matrix"] == [[3, 1], [1, 1]]  # rows: true neg/pos, columns: predicted
    neg = a["per_class"][0]
    assert neg["precision"] == pytest.approx(3 / 4) and neg["recall"] == pytest.approx(3 / 4) and neg["support"] == 4
    # mistakes, most confident first: t4 (pos at 0.8), then t1 (neg at 0.8) - ties keep input order
    assert [w["text"] for w in a["worst"]] == ["t1", "t4"] and a["worst"][0]["predicted"] == "neg"
    assert sum(b["count"] for b in a["by_length"]) == 6
    assert a["metrics"]["accuracy"] == pytest.approx(4 / 6)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    assert calibration(conf, rng.uniform(size=conf.size) < conf)["ece"] < 0.01
    assert calibration(np.full(1000, 0.99), np.arange(1000) < 600)["ece"] == pytest.approx(0.39)


def test_regression_analysis_lists_largest_errors():
    a = analyse("regression", np.array([[1.0], [2.0], [5.0]]), np.array([1.0, 2.5, 2.0]), ["a", "b", "c"], [4, 4, 4])
    assert [w["text"] for w in a["worst"]] == ["c", "b", "a"] and a["worst"][0]["abs_error"] == pytest.approx(3.0)


@pytest.fixture
def tiny_run(tiny_overrides, tmp_path):
    # an imbalanced dev set, so the majority baseline is not 0.5
    dev = write_jsonl(tmp_path / "dev3.jsonl", make_rows(30, seed=2)[:20] + [r for r in make_rows(40, seed=3)
                                                                              if r["label"] == "positive"][:10])
    extra_pos = [r for r in make_rows(40, seed=4) if r["label"] == "positive"][:16]
    train_file = write_jsonl(tmp_path / "train3.jsonl", make_rows(64) + extra_pos)  # 48 positive, 32 negative
    over = [o for o in tiny_overrides if not o.startswith(("data.dev=", "data.train="))]
    over += [f"data.train={train_file}", f"data.dev={dev}", "train.epochs=1"]
    return train(load_config(None, over)), dev


def test_eval_writes_the_analysis_into_the_run(tiny_run, capsys):
    run_dir, dev = tiny_run
    assert main(["eval", str(run_dir), "--data", str(dev)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a = json.loads((run_dir / "analysis" / "dev3.json").read_text())
    assert a["metrics"]["accuracy"] == pytest.approx(scores["accuracy"]) and a["examples"] == 30
    assert a["confusion"]["labels"] == ["negative", "positive"] and np.sum(a["confusion"]["matrix"]) == 30
    assert 0 <= a["calibration"]["ece"] <= 1 and a["calibration"]["bins"]


def test_baselines_majority_twin_and_reuse(tiny_run, capsys):
    run_dir, dev = tiny_run
    assert main(["eval", str(run_dir), "--data", str(dev), "--baselines"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(rows) == {"fine_tuned", "majority", "from_scratch"}
    assert rows["majority"]["accuracy"] == pytest.approx(20 / 30)  # train's majority is positive: 20 of 30 dev rows
    twin = run_dir / "baselines" / "from_scratch"
    twin_cfg = load_config(str(twin / "config.yaml"), [])
    run_cfg = load_config(str(run_dir / "config.yaml"), [])
    assert twin_cfg.model.from_scratch and twin_cfg.train == run_cfg.train and twin_cfg.data == run_cfg.data
    saved = json.loads((run_dir / "baselines.json").read_text())
    assert saved[str(dev)]["from_scratch"]["accuracy"] == rows["from_scratch"]["accuracy"]

    stamp = (twin / "summary.json").stat().st_mtime_ns  # a second call reuses the twin
    assert main(["eval", str(run_dir), "--data", str(dev), "--baselines"]) == 0
    assert (twin / "summary.json").stat().st_mtime_ns == stamp


def test_decoder_baselines_and_generation_analysis(tiny_llama_dir, tmp_path, capsys):
    from tests.conftest import make_chats

    tr = write_jsonl(tmp_path / "train.jsonl", make_chats(24))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_chats(6, seed=1))
    run_dir = train(load_config(None, [
        "task=causal_lm", f"model.name={tiny_llama_dir}", f"data.train={tr}", f"data.dev={dev}", "train.epochs=1",
        "train.batch_size=8", "train.precision=fp32", "train.progress=false", f"output_dir={tmp_path / 'run'}"]))
    argv = ["eval", str(run_dir), "--data", str(dev), "--labels", "positive,negative", "--max-new-tokens", "4"]
    assert main(argv + ["--baselines", "--icl-shots", "2"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(rows) == {"fine_tuned", "zero_shot", "icl_2_shot"}
    assert all("label_accuracy" in r and r["examples"] == 6 for r in rows.values())
    assert rows["icl_2_shot"]["icl_shots"] == 2
    a = json.loads((run_dir / "analysis" / "dev.json").read_text())  # the fine-tuned model's outputs, worst first
    assert a["task"] == "causal_lm" and len(a["outputs"]) == 6 and len(a["worst"]) == 6
    assert {"prompt", "reference", "output", "rouge_l"} <= set(a["worst"][0])
    assert [w["rouge_l"] for w in a["worst"]] == sorted(w["rouge_l"] for w in a["worst"])

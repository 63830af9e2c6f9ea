"""Integration: the packaged minilm-l6 end to end on small data (CLI contract, HF pipeline, eval, predict)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.integration


def sftlab(*args, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sftlab", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "run"
    proc = sftlab("train", "configs/quickstart.yaml", "train.epochs=2", "train.progress=false", f"output_dir={out}")
    assert proc.stdout.strip().splitlines()[-1] == str(out)  # contract: run dir is the last stdout line
    return out


def test_quickstart_learns_and_pipeline_loads_best(quick_run):
    from transformers import pipeline

    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["dev_metrics"]["accuracy"] >= 0.75  # 2 epochs on 240 demo rows; 4 epochs reach ~0.9
    clf = pipeline("text-classification", model=str(quick_run / "best"), device="cpu")
    preds = clf(["An absolute delight, I loved every minute.", "Broken on arrival and support never replied."])
    assert [p["label"] for p in preds] == ["positive", "negative"]


def test_eval_prints_json_last_and_matches_training_metrics(quick_run):
    proc = sftlab("eval", str(quick_run), "--data", "src/sftlab/demo/dev.jsonl")
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    best = json.loads((quick_run / "summary.json").read_text())["dev_metrics"]
    assert scores["examples"] == 80
    assert abs(scores["accuracy"] - best["accuracy"]) < 1e-9


def test_predict_writes_jsonl_with_scores(quick_run, tmp_path):
    out = tmp_path / "pred.jsonl"
    sftlab("predict", str(quick_run), "--data", "src/sftlab/demo/dev.jsonl", "--out", str(out))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 80 and {r["label"] for r in rows} <= {"negative", "positive"}
    assert all(0.5 <= r["score"] <= 1 and abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)
    again = sftlab("predict", str(quick_run), "--data", "src/sftlab/demo/dev.jsonl", "--out", str(out), check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr  # never overwrites a user's file


def test_existing_run_dir_is_not_overwritten(quick_run):
    before = (quick_run / "summary.json").read_bytes()
    proc = sftlab("train", "configs/quickstart.yaml", f"output_dir={quick_run}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("sftlab: error: output_dir")
    assert "Traceback" not in proc.stderr and (quick_run / "summary.json").read_bytes() == before


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "rte", "stsb"])
def test_glue_configs_read_every_row(task):
    proc = sftlab("data", "check", f"configs/glue/{task}.yaml", f"data.dir={SHARED_DATA}", "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3667, 408), "rte": (2490, 277),
                "stsb": (5749, 1500)}[task]
    assert (report["train"]["rows"], report["dev"]["rows"]) == expected
    assert not report["train"]["skipped"]


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data not present")
def test_glue_sentence_pair_regression_trains(tmp_path):
    """STS-B (pairs, regression) on 512 rows x 2 epochs: Pearson well above chance (0.77 seen)."""
    out = tmp_path / "stsb"
    sftlab("train", "configs/glue/stsb.yaml", f"data.dir={SHARED_DATA}", "data.limit_train=512",
           "data.limit_dev=200", "train.epochs=2", "train.batch_size=16", "train.progress=false", f"output_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dev_metrics"]["pearson"] > 0.6


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data not present")
def test_glue_multitask_config_reads_every_task_and_trains(tmp_path):
    """configs/glue/multitask.yaml: data check counts every task's rows; a small slice of it trains on minilm-l6
    and `eval --task` of a head reproduces its dev figure."""
    proc = sftlab("data", "check", "configs/glue/multitask.yaml", f"data.dir={SHARED_DATA}", "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {k: v["rows"] for k, v in report.items() if k.endswith("/train")}
    assert rows == {"sst2/train": 67349, "cola/train": 8551, "mrpc/train": 3667, "rte/train": 2490,
                    "stsb/train": 5749}
    assert abs(sum(report["mixture"]["share"].values()) - 1) < 1e-6
    out = tmp_path / "mt"
    limits = [f"tasks.{t}.{k}={n}" for t in ("sst2", "cola", "mrpc", "rte", "stsb")
              for k, n in (("limit_train", 96), ("limit_dev", 64))]
    sftlab("train", "configs/glue/multitask.yaml", f"data.dir={SHARED_DATA}", *limits, "data.max_length=128",
           "train.epochs=1", "train.batch_size=16", "train.eval_every=null", "train.progress=false",
           f"output_dir={out}")
    dev = json.loads((out / "summary.json").read_text())["dev_metrics"]
    assert {"sst2/accuracy", "cola/mcc", "mrpc/accuracy", "rte/accuracy", "stsb/pearson", "mean"} <= set(dev)
    proc = sftlab("eval", str(out), "--task", "stsb", "--data", str(SHARED_DATA / "glue/stsb/dev.tsv"), "--fp32")
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["examples"] == 1500  # (the whole dev file; training scored its first 64 rows)


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="../shared/data not present")
def test_fewshot_config_self_trains_with_eda_on_sst2(tmp_path):
    """configs/fewshot/sst2.yaml on minilm-l6: an 8-shot sample with EDA copies (WordNet on real sentences), one
    self-training round over 200 unlabelled SST-2 sentences; the round's pseudo rows are class-balanced."""
    out = tmp_path / "st"
    proc = sftlab("self-train", "configs/fewshot/sst2.yaml", f"data.dir={SHARED_DATA}", "data.k_shot=8",
                  "data.augment.name=eda", "data.augment.copies=2", "data.unlabelled=glue/sst2/train.tsv",
                  "data.limit_unlabelled=200", "data.limit_dev=64", "train.max_steps=6", "train.eval_every=6",
                  "train.progress=false", "--rounds", "1", "--threshold", "0.5", "--out", str(out))
    assert proc.stdout.strip().splitlines()[-1] == str(out / "round-1")
    train = json.loads((out / "round-0" / "summary.json").read_text())["data"]["train"]
    assert train["rows"] == 16 * 3 and train["labels"] == {"0": 24, "1": 24}
    pseudo = [json.loads(x) for x in (out / "round-1" / "pseudo.jsonl").read_text().splitlines()]
    counts = {label: sum(p["label"] == label for p in pseudo) for label in ("0", "1")}
    assert counts["0"] == counts["1"] and all(p["score"] >= 0.5 for p in pseudo)

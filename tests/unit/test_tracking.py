"""TensorBoard event files mirror metrics.jsonl; MLflow gets params, the same metrics and the summary."""
from __future__ import annotations

import json

import pytest

from sftlab.config import load_config
from sftlab.train.loop import train


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_equal_metrics_jsonl(tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(load_config(None, tiny_overrides + ["train.log_every=2"]))
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    recs = records(run_dir)
    train_loss = [(r["step"], r["loss"]) for r in recs if "split" not in r]
    dev_acc = [(r["step"], r["accuracy"]) for r in recs if r.get("split") == "dev"]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/loss")] == train_loss
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("dev/accuracy")] == dev_acc
    assert {"train/lr", "train/examples_per_s", "dev/loss"} <= set(acc.Tags()["scalars"])


def test_tensorboard_off(tiny_overrides):
    run_dir = train(load_config(None, tiny_overrides + ["train.tensorboard=false"]))
    assert not (run_dir / "tensorboard").exists()


def test_mlflow_run_has_params_metrics_summary_and_resume_continues_it(tiny_overrides, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path / "..")  # nothing may land in the working directory
    before = set(tmp_path.parent.iterdir())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = tiny_overrides + [f"train.mlflow_uri={uri}", "train.mlflow_experiment=tiny", "train.eval_every=4"]
    import sftlab.train.loop as loop

    from tests.conftest import crash_after_checkpoint

    real = crash_after_checkpoint(monkeypatch, calls=1)  # stop the run right after its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, over))
    run_dir = tmp_path / "run"
    first_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    monkeypatch.setattr(loop, "save_checkpoint", real)
    mlflow.end_run()  # the interrupted process would have died with its run still open
    train(load_config(None, over), resume=run_dir)
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == first_id

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1 and runs["run_id"][0] == first_id
    row = runs.iloc[0]
    assert row["params.train.lr"] == "0.001" and row["params.task"] == "classification"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert row["metrics.summary.steps"] == summary["steps"]
    history = mlflow.tracking.MlflowClient().get_metric_history(first_id, "dev.accuracy")
    dev = [(r["step"], r["accuracy"]) for r in records(run_dir) if r.get("split") == "dev"]
    logged = {m.step: m.value for m in history}  # a step replayed after the crash would repeat, not differ
    assert sorted(logged) == [step for step, _ in dev]
    assert [logged[step] for step, _ in dev] == pytest.approx([value for _, value in dev])
    assert set(tmp_path.parent.iterdir()) == before


def test_mlflow_missing_is_a_config_error(tiny_overrides, monkeypatch):
    import builtins

    from sftlab.errors import ConfigError

    real_import = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ConfigError, match="pip install 'sftlab\\[mlflow\\]'"):
        train(load_config(None, tiny_overrides + ["train.mlflow_uri=sqlite:///x.db"]))

"""`sftlab tune`: Optuna search on the tiny fixtures; best.yaml trains as-is, studies resume, prune, share workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import DataError
from sftlab.train import loop  # `sftlab.train` alone is the lazy train() function

SPACE = {"metric": "accuracy",
         "space": {"train.lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True}, "train.batch_size": {"choices": [8, 16]},
                   "train.warmup_ratio": {"low": 0.0, "high": 0.2}}}


def write_config(tmp_path: Path, overrides: list[str], search=SPACE, name="toy") -> Path:
    """The tiny-run overrides as a YAML config (without output_dir) with a search: section."""
    raw: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "output_dir":
            continue
        section, _, leaf = key.partition(".")
        raw.setdefault(section, {})[leaf] = yaml.safe_load(value)
    if search is not None:
        raw["search"] = search
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def storage_of(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'study.db'}"


def states(out: Path, name="toy") -> list[str]:
    study = optuna.load_study(study_name=name, storage=storage_of(out))
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_best_yaml_trains_as_is_and_the_study_resumes(tiny_overrides, tmp_path, capsys):
    # dev loss: the toy model's accuracy barely moves in 2 epochs, its loss tells the trials apart
    cfg, out = write_config(tmp_path, tiny_overrides, search={**SPACE, "metric": "loss"}), tmp_path / "tune"
    assert main(["tune", str(cfg), "--trials", "2", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    best_path = Path(stdout[-1])
    assert best_path == out / "best.yaml" and stdout[0].startswith("| trial | state | dev loss | train.")

    result = json.loads((out / "results.json").read_text())
    assert [r["state"] for r in result["trials"]] == ["complete", "complete"]
    best = result["best"]
    assert result["direction"] == "minimize" and best["value"] == min(r["value"] for r in result["trials"])
    best_cfg = load_config(best_path)  # a complete config: the same data, the winning values
    for key, value in best["params"].items():
        section, leaf = key.split(".")
        assert getattr(getattr(best_cfg, section), leaf) == value
    assert best_cfg.data.train == load_config(None, tiny_overrides).data.train and best_cfg.train.metric == "loss"
    assert best_cfg.output_dir.startswith("runs/toy-best-") and "{" not in best_cfg.output_dir  # fresh per train
    assert "search" not in best_path.read_text()
    for r in result["trials"]:  # each trial is a normal run dir (checkpoints dropped: trials never resume)
        run_dir = Path(r["run_dir"])
        assert (run_dir / "best" / "sftlab.json").is_file() and not (run_dir / "checkpoints").exists()
        assert json.loads((Path(r["run_dir"]) / "summary.json").read_text())["dev_metrics"]["loss"] == r["value"]

    # `sftlab train best.yaml` reproduces the winning trial (same seed, data and values)
    assert main(["train", str(best_path), f"output_dir={tmp_path / 'retrain'}"]) == 0
    capsys.readouterr()
    retrained = json.loads((tmp_path / "retrain" / "summary.json").read_text())["dev_metrics"]["loss"]
    assert retrained == pytest.approx(best["value"])

    # the same command with --trials 3 resumes: one new trial, the first two untouched
    before = (out / "trial-0" / "summary.json").stat().st_mtime_ns
    assert main(["tune", str(cfg), "--trials", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "best.yaml")
    assert states(out) == ["COMPLETE"] * 3
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0", "trial-1", "trial-2"]
    assert (out / "trial-0" / "summary.json").stat().st_mtime_ns == before
    # resumed trials draw new values (the sampler is seeded per trial position, not once per command)
    params = [r["params"]["train.lr"] for r in json.loads((out / "results.json").read_text())["trials"]]
    assert len(set(params)) == 3
    # enough already: nothing runs
    assert main(["tune", str(cfg), "--trials", "2", "--out", str(out)]) == 0
    assert len(states(out)) == 3


def test_median_pruner_stops_a_worse_trial(tiny_overrides, tmp_path, capsys):
    """Two finished trials scored 2.0 at every evaluation (more than any accuracy): the next is pruned at its
    first evaluation, after one epoch of two."""
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(storage=storage_of(out), study_name="toy", direction="maximize")
    dists = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True),
             "train.batch_size": optuna.distributions.CategoricalDistribution([8, 16]),
             "train.warmup_ratio": optuna.distributions.FloatDistribution(0.0, 0.2)}
    for lr in (1e-3, 2e-3):
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": lr, "train.batch_size": 8, "train.warmup_ratio": 0.1}, distributions=dists,
            value=2.0, intermediate_values={1: 2.0, 2: 2.0}))
    assert main(["tune", str(cfg), "--trials", "3", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["state"] for r in result["trials"]] == ["complete", "complete", "pruned"]
    summary = json.loads((out / "trial-2" / "summary.json").read_text())
    steps_per_epoch = 64 // result["trials"][2]["params"]["train.batch_size"]
    assert summary["steps"] == steps_per_epoch  # stopped at the first evaluation, not after epoch 2
    assert "pruned after evaluation 1" in capsys.readouterr().err
    assert result["best"]["trial"] in (0, 1)


def fake_train(fail_on: dict, diverge_on=()):
    """A stand-in for train(): writes a summary with an accuracy from the lr, or raises for chosen trials."""
    def train(cfg, *, resume=None, overwrite=False, on_eval=None):
        run_dir = Path(cfg.output_dir)
        name = run_dir.name
        if name in fail_on:
            raise fail_on[name]
        run_dir.mkdir(parents=True)
        acc = 1 - cfg.train.lr
        loss = float("nan") if name in diverge_on else 0.5
        assert on_eval(1, {"accuracy": 1.0, "loss": loss}) is (name in diverge_on)  # 1.0: never below the median
        (run_dir / "summary.json").write_text(json.dumps({"train_seconds": 0.1, "dev_metrics": {"accuracy": acc}}))
        return run_dir
    return train


def test_failed_trials_are_recorded_and_interrupts_resume(tiny_overrides, tmp_path, capsys, monkeypatch):
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    monkeypatch.setattr(loop, "train", fake_train({
        "trial-1": DataError("dev.jsonl:3: bad label"), "trial-2": RuntimeError("CUDA out of memory. Tried ..."),
        "trial-3": KeyboardInterrupt()}))
    assert main(["tune", str(cfg), "--trials", "3", "--out", str(out)]) == 130  # Ctrl-C in trial 3
    err = capsys.readouterr().err
    assert "trial 1: failed: dev.jsonl:3: bad label" in err and "trial 2: failed: out of memory" in err
    assert "re-run the same command to resume" in err
    assert states(out) == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    # the same command continues: failures do not count toward --trials
    assert main(["tune", str(cfg), "--trials", "3", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["state"] for r in result["trials"]] == ["complete", "fail", "fail", "fail", "complete", "complete"]
    assert result["trials"][1]["error"] == "dev.jsonl:3: bad label"
    assert "| 1 | fail (dev.jsonl:3: bad label) |" in capsys.readouterr().out


def test_a_diverged_trial_fails_and_the_search_goes_on(tiny_overrides, tmp_path, capsys, monkeypatch):
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    monkeypatch.setattr(loop, "train", fake_train({}, diverge_on={"trial-0"}))
    assert main(["tune", str(cfg), "--trials", "2", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["state"] for r in result["trials"]] == ["fail", "complete", "complete"]
    assert result["trials"][0]["error"] == "diverged: dev accuracy=1.0, loss=nan at step 1"
    assert result["best"]["trial"] in (1, 2)


def test_three_failures_in_a_row_stop_with_one_line(tiny_overrides, tmp_path, capsys, monkeypatch):
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    monkeypatch.setattr(loop, "train", fake_train({f"trial-{i}": DataError("missing.tsv: file not found")
                                                               for i in range(5)}))
    assert main(["tune", str(cfg), "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sftlab: error: 3 trials in a row failed") and "missing.tsv" in err
    assert states(out) == ["FAIL"] * 3


@pytest.mark.parametrize("space, message", [
    ({"space": {"train.lrr": {"low": 1e-5, "high": 1e-3}}},
     "search.space.train.lrr: train.lrr: unknown key; did you mean train.lr?"),
    ({"space": {}}, "search.space is empty"),
    ({"metric": "accuracy"}, "search.space is empty"),
    ({"space": {"train.lr": {"low": 1e-3, "high": 1e-5}}}, "search.space.train.lr: low (0.001) must be < high (1e-05)"),
    ({"space": {"train.warmup_ratio": {"low": 0.0, "high": 0.2, "log": True}}}, "log: true needs low > 0"),
    ({"space": {"train.lr": {"low": 1e-5, "hi": 1e-3}}}, "search.space.train.lr: unknown field 'hi'"),
    ({"space": {"train.warmup_ratio": {"low": 0.0, "high": 1.5}}}, "train.warmup_ratio must be in [0, 1)"),
    ({"space": {"train.batch_size": {"choices": []}}}, "search.space.train.batch_size.choices: expected a non-empty"),
    ({"space": {"train.batch_size": 16}}, "expected {low: .., high: ..} or {choices: [..]}"),
    ({"metric": "pearson", "space": {"train.lr": {"low": 1e-5, "high": 1e-3}}},
     "search.metric: train.metric 'pearson'"),
    ({"direction": "minimize", "space": {"train.lr": {"low": 1e-5, "high": 1e-3}}}, "does not fit metric accuracy"),
    ({"spaces": {}}, "search.spaces: unknown key"),
])
def test_space_errors_are_one_line(space, message, tiny_overrides, tmp_path, capsys):
    cfg, out = write_config(tmp_path, tiny_overrides, search=space), tmp_path / "tune"
    assert main(["tune", str(cfg), "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sftlab: error: ") and message in err[0], err
    assert not out.exists()  # checked before anything was created


def test_space_file_and_overrides_after_options(tiny_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "train", fake_train({}))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": {"space": {"train.lr": {"choices": [1.0e-3, 2.0e-3]},
                                                          "strategy.r": {"low": 4, "high": 16, "step": 4}}}}))
    # strategy.r is a lora option (issue 15: options of another strategy are refused, so is a search over them)
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + ["strategy.name=lora"]
    out = tmp_path / "t"
    assert main(["tune", "-", "--trials", "2", "--space", str(space), "--out", str(out), *over]) == 0
    best = load_config(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((out / "results.json").read_text())
    assert best.train.lr == min(r["params"]["train.lr"] for r in result["trials"])  # fake accuracy = 1 - lr
    assert best.strategy.r == result["best"]["params"]["strategy.r"] and best.strategy.r in (4, 8, 12, 16)
    assert best.output_dir.startswith("runs/overrides-best-")
    assert all(isinstance(r["params"]["strategy.r"], int) for r in result["trials"])
    # a different space for the same study is refused
    space.write_text(yaml.safe_dump({"space": {"train.lr": {"choices": [1.0e-3]}}}))
    assert main(["tune", "-", "--trials", "3", "--space", str(space), "--out", str(out), *over]) == 2
    assert "another search space" in capsys.readouterr().err
    # trial folders of another study in --out are refused too
    assert main(["tune", "-", "--trials", "3", "--space", str(space), "--out", str(out), "--study-name", "x",
                 *over]) == 2
    assert "trial-0 belongs to no trial of study 'x'" in capsys.readouterr().err


def test_a_trial_failed_by_another_worker_is_dropped_and_its_retry_runs(tiny_overrides, tmp_path, capsys,
                                                                         monkeypatch):
    """A worker starved past the heartbeat grace period finds its trial FAILed (and re-queued) by another worker:
    optuna then refuses its report (UpdateFinishedTrialError); the worker goes on instead of crashing."""
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    fake = fake_train({})

    def train(cfg, *, resume=None, overwrite=False, on_eval=None):
        if Path(cfg.output_dir).name == "trial-1":  # what fail_stale + RetryHeartbeatStaleTrialCallback do
            study = optuna.load_study(study_name="toy", storage=storage_of(out))
            trial = study.get_trials(deepcopy=False)[1]
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)
        return fake(cfg, on_eval=on_eval)

    monkeypatch.setattr(loop, "train", train)
    assert main(["tune", str(cfg), "--trials", "3", "--out", str(out)]) == 0
    assert "trial 1: failed by another worker" in capsys.readouterr().err
    assert states(out) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_two_workers_share_one_study(tiny_overrides, tmp_path):
    """Two processes on one sqlite study: together exactly --trials finished trials, each a distinct run dir."""
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    cmd = [sys.executable, "-m", "sftlab", "tune", str(cfg), "--trials", "3", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    # only a failed worker's stderr, its end first: pytest cuts long messages in the middle
    assert [p.returncode for p in procs] == [0, 0], "\n".join(
        f"worker {i} exit {p.returncode}: ...{o[1][-1500:]}" for i, (p, o) in enumerate(zip(procs, outs))
        if p.returncode)
    assert {o[0].strip().splitlines()[-1] for o in outs} == {str(out / "best.yaml")}
    study = optuna.load_study(study_name="toy", storage=storage_of(out))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    # a trial asked in the same instant by both workers is dropped as surplus, never trained
    assert all(t.user_attrs.get("error", "").startswith("not needed") for t in study.trials if t not in finished)
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{t.number}" for t in finished]


def test_trial_0_is_the_config_as_written_and_train_accepts_the_tune_file(tiny_overrides, tmp_path, capsys):
    # tiny_overrides: lr 1e-3, batch 8, warmup 0.06 (default) - all inside SPACE, so trial 0 runs them as written
    cfg, out = write_config(tmp_path, tiny_overrides), tmp_path / "tune"
    assert main(["tune", str(cfg), "--trials", "1", "--out", str(out)]) == 0
    study = optuna.load_study(study_name="toy", storage=storage_of(out))
    first = study.get_trials(deepcopy=False)[0]
    assert first.params == {"train.lr": 1e-3, "train.batch_size": 8, "train.warmup_ratio": 0.06}
    assert first.user_attrs.get("default") is True
    assert load_config(str(cfg), []).train.lr == 1e-3  # `sftlab train` ignores the search: section


def test_no_search_section_searches_the_default_space(tiny_overrides, tmp_path, capsys, monkeypatch):
    """Issue 15: like the HF Trainer's hyperparameter_search, a config without search: gets a documented space."""
    from sftlab.tune import default_space

    monkeypatch.setattr(loop, "train", fake_train({}))
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    out = tmp_path / "t"
    assert main(["tune", "-", "--trials", "2", "--out", str(out), *over]) == 0
    assert "default space" in capsys.readouterr().err
    trials = json.loads((out / "results.json").read_text())["trials"]
    assert set(trials[0]["params"]) == {"train.lr", "train.batch_size", "train.warmup_ratio", "train.weight_decay"}
    lora = default_space({"strategy": {"name": "lora"}})
    assert {"strategy.r", "strategy.alpha"} <= set(lora) and lora["train.lr"]["log"] is True
    assert "train.warmup_steps" in default_space({"train": {"warmup_steps": 10}})

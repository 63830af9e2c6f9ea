"""Issue 15, the smaller promises of a mature tool: baselines the model does not beat are flagged, the report's error
analysis scores the same dev rows as training (data.limit_dev), a packed decoder run counts examples (not packs),
`sftlab env` / `--version`, and the config refusals that have no CLI case of their own."""
from __future__ import annotations

import json

import pytest
import torch

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.eval.baselines import flags
from tests.conftest import make_chats, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


def test_baselines_the_model_does_not_beat_are_flagged():
    rows = {"fine_tuned": {"accuracy": 0.51}, "majority": {"accuracy": 0.51}, "from_scratch": {"accuracy": 0.7}}
    out = flags(rows)
    assert len(out) == 2 and "no better than the majority class (accuracy 0.5100 vs 0.5100)" in out[0]
    assert "from-scratch twin" in out[1]
    assert flags({"fine_tuned": {"pearson": 0.9}, "majority": {"pearson": 0.0}}) == []


def test_report_analysis_scores_the_rows_training_scored(tiny_overrides, tmp_path):
    from sftlab.report.collect import load_run
    from sftlab.train.loop import train

    run = train(load_config(None, tiny_overrides + ["data.limit_dev=8", "train.epochs=1"]))
    loaded = load_run(run, "r", evaluate=True)
    body = loaded.analyses[0].body
    assert body["limit"] == 8 and body["examples"] == 8
    summary = json.loads((run / "summary.json").read_text())
    dev_metric = summary["dev_metrics"]["accuracy"]
    assert body["metrics"]["accuracy"] == pytest.approx(dev_metric, abs=1e-6)  # one dev set, one figure


def test_packed_decoder_summary_counts_examples_not_packs(tiny_llama_dir, tmp_path):
    from sftlab.train.loop import train

    data = write_jsonl(tmp_path / "chats.jsonl", make_chats(24))
    cfg = load_config(None, [f"model.name={tiny_llama_dir}", "task=causal_lm", f"data.train={data}",
                             "data.packing=true", "data.max_length=256", "train.epochs=1", "train.batch_size=2",
                             "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                             f"output_dir={tmp_path / 'run'}"])
    summary = json.loads((train(cfg) / "summary.json").read_text())
    assert summary["examples"] == 24 and summary["steps"] < 12  # 24 chats in fewer packed rows


def test_env_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sftlab ")
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"].startswith("2.13") and "minilm-l6" in info["packaged_models_installed"]
    assert isinstance(info["bf16_faster_than_fp32"], bool) and info["cache"]
    torch.set_num_threads(torch.get_num_threads())


@pytest.mark.parametrize("overrides,words", [
    (["strategy.name=lora", "strategy.k=3"], "strategy.k: not an option of strategy lora"),
    (["strategy.reduction=8"], "strategy.reduction: not an option of strategy full"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    (["data.labels=[pos]"], "at least 2 classes"),
])
def test_config_refusals(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        load_config(None, ["data.train=x.jsonl", *overrides])


def test_options_that_match_defaults_or_belong_to_the_strategy_pass():
    load_config(None, ["data.train=x.jsonl", "strategy.name=lora", "strategy.r=8", "strategy.layer_decay=0.9"])
    load_config(None, ["data.train=x.jsonl", "strategy.r=16"])  # the default: a dumped config holds every key
    load_config(None, ["data.train=x.jsonl", "train.warmup_steps=10"])


def test_a_huge_row_is_checked_in_seconds(tiny_model_dir, tmp_path, capsys):
    """Issue 15: a 50 MB single row took 106 s in `data check`; only a capped prefix is tokenized now."""
    import time

    rows = [{"text": "the film was great " * 1_000_000, "label": "pos"}, {"text": "dull", "label": "neg"}]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    t0 = time.monotonic()
    assert main(["data", "check", "-", f"model.name={tiny_model_dir}", f"data.train={data}", "--json"]) == 0
    assert time.monotonic() - t0 < 30
    out = capsys.readouterr().out
    report = json.loads(out.splitlines()[-1])["train"]
    assert report["truncated"] == 1 and report["capped"] == 1 and "+ (before truncation)" in out

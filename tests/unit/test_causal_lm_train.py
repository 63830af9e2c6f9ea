"""Causal-LM through the same loop and CLI, on a tiny Llama: learns, resumes exactly, packs equivalently,
generates and evaluates by generation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.train.loop import train
from tests.conftest import crash_after_checkpoint, make_chats, write_jsonl


@pytest.fixture
def chat_overrides(tiny_llama_dir, tmp_path) -> list[str]:
    tr = write_jsonl(tmp_path / "train.jsonl", make_chats(48))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_chats(16, seed=1))
    return ["task=causal_lm", f"model.name={tiny_llama_dir}", f"data.train={tr}", f"data.dev={dev}",
            "data.max_length=160", "train.epochs=3", "train.batch_size=8", "train.lr=3e-3",
            "train.precision=fp32", "train.progress=false"]


def run(overrides, out, **kw):
    return train(load_config(None, overrides + [f"output_dir={out}"]), **kw)


def dev_losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("split") == "dev"]


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_loss_falls_and_best_reloads(chat_overrides, tmp_path, strategy):
    run_dir = run(chat_overrides + [f"strategy.name={strategy}"], tmp_path / strategy)
    losses = dev_losses(run_dir)
    assert losses[-1] < losses[0]
    meta = json.loads((run_dir / "best" / "sftlab.json").read_text())
    assert meta["adapter"] == ("peft" if strategy == "lora" else None)
    if strategy == "lora":  # adapter only: small
        assert (run_dir / "best" / "adapter_model.safetensors").stat().st_size < 200_000


def test_packing_trains_the_same_tokens(chat_overrides, tmp_path):
    plain = run(chat_overrides + ["train.epochs=1"], tmp_path / "plain")
    packed = run(chat_overrides + ["train.epochs=1", "data.packing=true"], tmp_path / "packed")
    sp, sk = (json.loads((d / "summary.json").read_text()) for d in (plain, packed))
    assert sp["data"]["train"]["loss_tokens"] == sk["data"]["train"]["loss_tokens"]
    assert sk["data"]["train"]["packs"] < sp["data"]["train"]["examples"]
    assert sk["steps"] < sp["steps"]


def test_lora_resume_equals_uninterrupted(chat_overrides, tmp_path, monkeypatch):
    import sftlab.train.loop as loop

    over = chat_overrides + ["strategy.name=lora", "train.eval_every=3", "train.epochs=2"]
    ref = run(over, tmp_path / "ref")
    real = crash_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        run(over, tmp_path / "part")
    monkeypatch.setattr(loop, "save_checkpoint", real)
    run(over, tmp_path / "part", resume=tmp_path / "part")

    def last(d):
        return load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))

    wa, wb = last(ref), last(tmp_path / "part")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # issue 15: a LoRA checkpoint holds what trains (and buffers), not the frozen base
    params = [k for k in wa if "rotary" not in k and "inv_freq" not in k]
    assert params and all("lora_" in k for k in params), sorted(wa)[:5]


def test_generate_and_generation_eval(chat_overrides, tmp_path, capsys):
    run_dir = run(chat_overrides, tmp_path / "g")
    assert main(["generate", str(run_dir), "--prompt", "Is this positive or negative? the film was great",
                 "--max-new-tokens", "4", "-n", "2", "--sample"]) == 0
    assert len(capsys.readouterr().out.split("\n")) == 3  # two replies (a tiny model may say nothing)
    dev = [x for x in chat_overrides if x.startswith("data.dev=")][0].split("=", 1)[1]
    out = tmp_path / "outputs.jsonl"
    assert main(["eval", str(run_dir), "--data", dev, "--labels", "positive,negative", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"label_accuracy", "exact_match", "bleu", "rouge_l", "ref_perplexity", "examples"} <= set(scores)
    assert scores["examples"] == 16 and len(out.read_text().splitlines()) == 16
    # ICL on the base (un-tuned) model: shots come from the config's data.train
    cfg = tmp_path / "icl.yaml"
    cfg.write_text(f"task: causal_lm\ndata: {{train: {[x for x in chat_overrides if x.startswith('data.train=')][0].split('=', 1)[1]}}}\n")
    base = [x for x in chat_overrides if x.startswith("model.name=")][0].split("=", 1)[1]
    assert main(["eval", base, "--config", str(cfg), "--data", dev, "--icl-shots", "2", "--labels",
                 "positive,negative", "--max-new-tokens", "3"]) == 0
    icl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert icl["icl_shots"] == 2 and icl["examples"] == 16


def test_gradient_checkpointing_gives_the_same_weights(chat_overrides, tmp_path):
    over = chat_overrides + ["train.epochs=1", "strategy.name=lora"]
    a = run(over, tmp_path / "a")
    b = run(over + ["train.gradient_checkpointing=true"], tmp_path / "b")

    def last(d):
        return load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))

    wa, wb = last(a), last(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_interactive_chat(chat_overrides, tmp_path, monkeypatch, capsys):
    run_dir = run(chat_overrides + ["train.epochs=1"], tmp_path / "c")
    lines = iter(["Is this positive or negative? the meal was awful", "/reset", "", "hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(run_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2  # two real turns; /reset and blank lines answer nothing

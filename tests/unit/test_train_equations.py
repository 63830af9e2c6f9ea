"""The loop's invariants, stated as equations on the tiny model (TRL-style)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sftlab.config import load_config
from sftlab.train.loop import train


def weights(run_dir):
    return load_file(str(run_dir / "best" / "model.safetensors"))


def last_ckpt_weights(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / "model.safetensors"))


def run(overrides, tmp_path, name, **kw):
    cfg = load_config(None, overrides + [f"output_dir={tmp_path / name}"])
    return train(cfg, **kw)


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max abs diff {worst}"


def test_accumulation_equals_larger_batch(tiny_overrides, tmp_path):
    base = tiny_overrides + ["train.epochs=1", "train.group_by_length=false"]
    big = run(base + ["train.batch_size=8", "train.grad_accum=1"], tmp_path, "b8")
    small = run(base + ["train.batch_size=2", "train.grad_accum=4"], tmp_path, "b2x4")
    assert_close(last_ckpt_weights(big), last_ckpt_weights(small), atol=1e-5)


def test_same_seed_same_weights_other_seed_differs(tiny_overrides, tmp_path):
    a = run(tiny_overrides + ["train.epochs=1"], tmp_path, "a")
    b = run(tiny_overrides + ["train.epochs=1"], tmp_path, "b")
    c = run(tiny_overrides + ["train.epochs=1", "train.seed=1"], tmp_path, "c")
    wa, wb, wc = last_ckpt_weights(a), last_ckpt_weights(b), last_ckpt_weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


class Crash(Exception):
    pass


@pytest.mark.parametrize("eval_every,crash_at", [(4, 4), (None, 8), (None, 16)], ids=["mid-epoch", "epoch-end", "end"])
def test_resume_equals_uninterrupted(tiny_overrides, tmp_path, monkeypatch, eval_every, crash_at):
    """Crash right after the checkpoint at `crash_at`, resume: bitwise the weights of one straight run."""
    import sftlab.train.loop as loop

    extra = [f"train.eval_every={eval_every}"] if eval_every else []
    ref = run(tiny_overrides + extra + ["train.grad_accum=2", "train.batch_size=4"], tmp_path, "ref")
    real_save = loop.save_checkpoint

    def save_then_crash(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        if step == crash_at:
            raise Crash()

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    part = tmp_path / "part"
    cfg = load_config(None, tiny_overrides + extra + ["train.grad_accum=2", "train.batch_size=4", f"output_dir={part}"])
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    train(cfg, resume=part)
    wa, wb = last_ckpt_weights(ref), last_ckpt_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ref_log = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    part_log = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]  # noqa: E731
    if crash_at != 16:
        assert strip(ref_log) == strip(part_log)


def test_trainable_params_move_and_metrics_written(tiny_overrides, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_dir = run(tiny_overrides, tmp_path, "m")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "dev" for r in records) and any("loss" in r and "lr" in r for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dev_metrics"]["accuracy"] >= 0.5 and summary["train_examples_per_s"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "best")
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_early_stopping_and_best_checkpoint(tiny_overrides, tmp_path):
    """lr=0 never improves: with patience 2 the run stops after 3 evaluations; best/ is the first one's model."""
    run_dir = run(tiny_overrides + ["train.lr=1e-12", "train.epochs=10", "train.eval_every=2",
                                    "train.early_stopping_patience=2", "train.metric=loss", "train.warmup_ratio=0"],
                  tmp_path, "es")
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r.get("split") == "dev"]
    losses = [r["loss"] for r in evals]
    summary = json.loads((run_dir / "summary.json").read_text())
    best = min(range(len(losses)), key=losses.__getitem__)
    assert summary["best_step"] == evals[best]["step"]
    assert summary["steps"] < 80  # stopped long before 10 epochs x 8 steps
    assert len(evals) - 1 - best == 2  # exactly `patience` evaluations without improvement


def test_checkpoints_from_before_objectives_still_resume(tiny_overrides, tmp_path, monkeypatch):
    """A checkpoint written before issue 15/16 (the whole model strictly loaded; no model_tensors, frozen,
    window_parts or streams in state.json) resumes to the weights of a straight run."""
    import sftlab.train.loop as loop
    from tests.conftest import crash_after_checkpoint

    ref = run(tiny_overrides + ["train.eval_every=4"], tmp_path, "ref")
    real_save = crash_after_checkpoint(monkeypatch, step=4)
    part = tmp_path / "part"
    cfg = load_config(None, tiny_overrides + ["train.eval_every=4", f"output_dir={part}"])
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    state_file = part / "checkpoints" / "step-0000004" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("model_tensors", "frozen", "window_parts", "streams"):
        state.pop(key, None)
    state_file.write_text(json.dumps(state))
    (part / "labels.json").unlink()  # runs before the label record: the label set is read from best/sftlab.json
    train(cfg, resume=part)
    wa, wb = last_ckpt_weights(ref), last_ckpt_weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

"""The loop's guards (issue 7): non-finite steps are skipped and K in a row stop the run; a non-finite model is never
saved; out of memory halves the micro-batch (train.auto_batch_size) and the size survives resume.

Faults are injected by wrapping the registered objective; runs are in-process on the tiny BERT, one thread.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import TrainingError
from sftlab.registry import tasks
from sftlab.tasks import task_spec
from sftlab.train.checkpoint import complete_checkpoints
from sftlab.train.loop import train

# 64 rows, batch 8, one epoch: 8 steps; evaluation + checkpoint after every step, all kept. One micro-batch per
# step (no token-budget cuts), so that the objective's call number is the step number.
EVERY_STEP = ["train.epochs=1", "train.num_threads=1", "train.tensorboard=false", "train.eval_every=1",
              "train.keep_checkpoints=100", "train.log_every=1", "train.log_example_ids=true",
              "train.micro_batch_tokens=null"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(overrides, tmp_path, name, **kw):
    return train(load_config(None, overrides + [f"output_dir={tmp_path / name}"]), **kw)


def inject(monkeypatch, fault) -> list[int]:
    """Wrap the classification task's loss: fault(call_no, model, batch, loss) -> loss for training calls (evaluation
    runs the loss too, without grad, and is left alone). Returns the call counter."""
    import dataclasses

    spec = task_spec("classification")
    real = spec.loss
    calls = [0]

    def objective(model, batch):
        if not torch.is_grad_enabled():
            return real(model, batch)
        calls[0] += 1
        loss, logits = real(model, batch)
        return fault(calls[0], model, batch, loss), logits

    monkeypatch.setitem(tasks._items, "classification", dataclasses.replace(spec, loss=objective))
    return calls


def ckpt(run_dir, step, name="model.safetensors"):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / name))


def ckpt_state(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(run_dir) -> bool:
    files = [*run_dir.glob("checkpoints/step-*/*.safetensors"), *run_dir.glob("best/*.safetensors")]
    assert files
    return all(bool(torch.isfinite(t.float()).all()) for f in files for t in load_file(str(f)).values())


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def nan_grad(loss, model):
    """Finite loss, NaN gradients: d/dx sqrt(x) at 0 is inf, times 0 is NaN."""
    x = next(p for p in model.parameters() if p.requires_grad).sum() * 0
    return loss + 0 * torch.sqrt(x)


# --- NaN / inf guard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_the_run_goes_on(tiny_overrides, tmp_path, monkeypatch, capsys, kind):
    clean = run(tiny_overrides + EVERY_STEP, tmp_path, "clean")
    poison = (lambda loss, model: loss * float("nan")) if kind == "loss" else nan_grad
    inject(monkeypatch, lambda n, model, batch, loss: poison(loss, model) if n == 3 else loss)
    run_dir = run(tiny_overrides + EVERY_STEP, tmp_path, "nan")
    # Across the skipped step 3: weights, optimizer moments and the schedule are bitwise unchanged.
    assert equal(ckpt(run_dir, 2), ckpt(run_dir, 3))
    assert equal(ckpt(run_dir, 2, "optimizer.safetensors"), ckpt(run_dir, 3, "optimizer.safetensors"))
    s2, s3 = ckpt_state(run_dir, 2), ckpt_state(run_dir, 3)
    assert s2["scheduler"] == s3["scheduler"] and s2["param_groups"] == s3["param_groups"]
    assert s3["bad_steps"] == 1 and ckpt_state(run_dir, 4)["bad_steps"] == 0
    assert not equal(ckpt(run_dir, 3), ckpt(run_dir, 4))  # training went on
    assert {"step": 3, "skipped": f"non-finite {kind}"} in records(run_dir)
    assert f"warning: step 3: non-finite {kind}; skipped it" in capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    # The data position advanced as in a clean run: the same examples at every step.
    assert (run_dir / "example_ids.jsonl").read_text() == (clean / "example_ids.jsonl").read_text()
    assert all_finite(run_dir)


def test_k_non_finite_steps_in_a_row_stop_the_run(tiny_overrides, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, lambda n, model, batch, loss: loss * float("inf") if n >= 2 else loss)
    run_dir = tmp_path / "run"
    code = main(["train", "-", *tiny_overrides, *EVERY_STEP, "train.max_bad_steps=3", f"output_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sftlab: error: step 4: non-finite loss in 3 steps in a row (train.max_bad_steps)")
    assert "lower train.lr" in last and f"--resume {run_dir}" in last
    assert [r["step"] for r in records(run_dir) if "skipped" in r] == [2, 3, 4]
    assert not (run_dir / "summary.json").exists()
    assert equal(ckpt(run_dir, 1), ckpt(run_dir, 3))  # nothing applied after step 1
    assert all_finite(run_dir)


def test_non_finite_weights_are_never_saved(tiny_overrides, tmp_path, monkeypatch):
    """A NaN that slips into the weights without a non-finite loss or gradient (an unused position row) stops the run
    at the next save, and nothing non-finite reaches checkpoints/ or best/."""

    def corrupt(n, model, batch, loss):
        if n == 3:
            with torch.no_grad():
                dict(model.named_parameters())["bert.embeddings.position_embeddings.weight"][127] = float("nan")
        return loss

    inject(monkeypatch, corrupt)
    with pytest.raises(TrainingError, match=r"^step 3: the weights hold NaN/inf "
                                            r"\(bert.embeddings.position_embeddings.weight\), so nothing was saved"):
        run(tiny_overrides + EVERY_STEP, tmp_path, "run")
    run_dir = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-0000001", "step-0000002"]
    assert all_finite(run_dir)


# --- out of memory --------------------------------------------------------------------------------------------

OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
}


def oom_above(rows: int, kind: str = "cuda"):
    def fault(n, model, batch, loss):
        if batch["input_ids"].shape[0] > rows:
            raise OOM_ERRORS[kind]()
        return loss
    return fault


@pytest.mark.parametrize("kind", list(OOM_ERRORS))
def test_auto_batch_size_halves_the_micro_batch_and_equals_a_run_set_to_it(tiny_overrides, tmp_path, monkeypatch,
                                                                          capsys, kind):
    base = tiny_overrides + EVERY_STEP + ["train.eval_every=4", "train.group_by_length=false"]
    direct = run(base + ["train.batch_size=2", "train.grad_accum=4"], tmp_path, "direct")
    inject(monkeypatch, oom_above(2, kind))
    auto = run(base + ["train.batch_size=8", "train.auto_batch_size=true"], tmp_path, "auto")
    err = capsys.readouterr().err
    assert "out of memory at step 1 with a micro-batch of 8: retrying the step with 4 (train.grad_accum 2" in err
    assert "out of memory at step 1 with a micro-batch of 4: retrying the step with 2 (train.grad_accum 4" in err
    summary = json.loads((auto / "summary.json").read_text())
    assert (summary["micro_batch_size"], summary["grad_accum"], summary["steps"]) == (2, 4, 8)
    assert ckpt_state(auto, 8)["grad_accum"] == 4
    assert equal(ckpt(direct, 8), ckpt(auto, 8))  # bitwise: the same micro-batches, summed in the same order
    assert (auto / "example_ids.jsonl").read_text() == (direct / "example_ids.jsonl").read_text()


class Crash(Exception):
    pass


def test_auto_batch_size_is_remembered_on_resume(tiny_overrides, tmp_path, monkeypatch, capsys):
    import sftlab.train.loop as loop

    base = tiny_overrides + EVERY_STEP + ["train.eval_every=4", "train.batch_size=8", "train.auto_batch_size=true"]
    inject(monkeypatch, oom_above(2))
    straight = run(base, tmp_path, "straight")
    real_save = loop.save_checkpoint

    def save_then_crash(run_dir, step, *a, **k):
        real_save(run_dir, step, *a, **k)
        if step == 4:
            raise Crash()

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    cfg = load_config(None, base + [f"output_dir={tmp_path / 'part'}"])
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    capsys.readouterr()
    train(cfg, resume=tmp_path / "part")
    err = capsys.readouterr().err
    assert "resumed from" in err and "out of memory" not in err  # started at micro-batch 2, no retry needed
    assert equal(ckpt(straight, 8), ckpt(tmp_path / "part", 8))


@pytest.mark.parametrize("auto", [True, False], ids=["auto-at-one", "auto-off"])
def test_out_of_memory_that_cannot_be_fixed_is_one_line(tiny_overrides, tmp_path, monkeypatch, capsys, auto):
    inject(monkeypatch, oom_above(0))
    code = main(["train", "-", *tiny_overrides, *EVERY_STEP, "train.batch_size=2",
                 f"train.auto_batch_size={str(auto).lower()}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    if auto:
        assert last.startswith("sftlab: error: step 1: out of memory even with a micro-batch of 1 (CUDA out of memory.")
        assert "train.gradient_checkpointing=true" in last
    else:
        assert last.startswith("sftlab: error: step 1: out of memory with a micro-batch of 2 (CUDA out of memory.")
        assert "set train.auto_batch_size=true" in last

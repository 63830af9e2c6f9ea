"""Two CPU processes (DDP on gloo through accelerate) == one process with the same step batch: 2 x batch 4
gives the weights of 1 x batch 8 (gradients all-reduced to the same mean).

Launchers: `torchrun --nproc_per_node 2` and `accelerate launch --multi_gpu --num_processes 2` (on a machine
without GPUs this starts 2 processes and sftlab's Accelerator(cpu=True) picks gloo; `accelerate launch --cpu
--num_processes 2` starts one process only, see DESIGN.md)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(run_dir):
    return load_file(str(sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


LAUNCHERS = {
    "torchrun": lambda port: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                              "--master_port", str(port), "-m", "sftlab"],
    "accelerate": lambda port: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port), "-m", "sftlab"],
}


def train_two_and_one(common: list[str], env: dict, two, one) -> None:
    """`common` under torchrun with 2 processes x batch 4 into `two`, and in one process x batch 8 into `one`."""
    for argv, out in ((LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.batch_size=4"], two),
                      (["-m", "sftlab", "train", "-", *common, "train.batch_size=8"], one)):
        proc = subprocess.run([sys.executable, *argv, f"output_dir={out}"], env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]


def logged(run_dir) -> list[dict]:
    """The training log lines' losses (loss and loss/PART), in order."""
    import json

    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k.startswith("loss")} for r in rows if "loss" in r and "split" not in r]


def same_curves(a: list[dict], b: list[dict], tol: float = 1e-5) -> bool:
    return len(a) == len(b) > 0 and all(x.keys() == y.keys() and all(abs(x[k] - y[k]) <= tol for k in x)
                                         for x, y in zip(a, b))


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_equal_one(tiny_overrides, tmp_path, launcher):
    """Weights and the logged loss curve (the global batch's mean on every line, not rank 0's rows')."""
    common = [o for o in tiny_overrides if not o.startswith(("output_dir", "train.batch_size"))] + [
        "train.epochs=1", "train.log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two = tmp_path / "ddp"
    cmd = [sys.executable, *LAUNCHERS[launcher](free_port()), "train", "-", *common, "train.batch_size=4",
           f"output_dir={two}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(two)
    one = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *common, "train.batch_size=8",
                           f"output_dir={one}"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wa, wb = ckpt(two), ckpt(one)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-5, worst
    assert same_curves(logged(two), logged(one)), (logged(two), logged(one))
    import json

    assert json.loads((two / "summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize("terms", ["logits", "internals"])
def test_two_processes_equal_one_when_distilling(tiny_overrides, wide_model_dir, tmp_path, terms):
    """Issue 16: distillation (cached teacher logits looked up by row id on every rank) keeps 2 processes == 1;
    so do the intermediate terms from a live, wider teacher, whose projection trains outside DDP (its gradient is
    averaged by hand) and is checkpointed beside the model."""
    from sftlab.config import load_config
    from sftlab.train.loop import train

    wide = [f"model.name={wide_model_dir}"] if terms == "internals" else []
    teacher = train(load_config(None, [o for o in tiny_overrides if not o.startswith("output_dir")]
                                + wide + ["train.max_steps=4", f"output_dir={tmp_path / 'teacher'}"]))
    common = [o for o in tiny_overrides if not o.startswith(("output_dir", "train.batch_size"))] + [
        "train.epochs=1", "objective.name=distill", f"objective.teacher={teacher}", "objective.alpha=0.5"]
    if terms == "internals":
        common += ["objective.attention_weight=1", "objective.hidden_weight=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SFTLAB_CACHE=str(tmp_path / "cache"))
    two, one = tmp_path / "ddp", tmp_path / "single"
    train_two_and_one(common, env, two, one)
    wa, wb = ckpt(two), ckpt(one)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    if terms == "internals":
        ea, eb = (load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / "extras.safetensors"))
                  for d in (two, one))
        assert ea.keys() == {"hidden_proj.weight", "hidden_proj.bias"}
        assert max((ea[k] - eb[k]).abs().max().item() for k in ea) <= 1e-5


def test_two_processes_equal_one_multitask(tiny_overrides, toy_data, tmp_path):
    """task: multitask under torchrun: every rank draws the same task per step (a pure function of seed and step),
    the other heads take no part, and the weights equal one process's."""
    import json

    rows = [{"text": r["text"], "score": float(r["label"] == "positive")} for r in __import__(
        "tests.conftest", fromlist=["make_rows"]).make_rows(40, seed=8)]
    reg = tmp_path / "reg.jsonl"
    reg.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = {"sent": {"train": toy_data["train"], "dev": toy_data["dev"]},
             "reg": {"task": "regression", "train": str(reg), "label": "score"}}
    common = [o for o in tiny_overrides if not o.startswith(("output_dir", "train.batch_size", "data.train",
                                                             "data.dev"))]
    common += ["train.epochs=1", "task=multitask", f"tasks={json.dumps(tasks)}", "train.log_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two, one = tmp_path / "ddp", tmp_path / "single"
    train_two_and_one(common, env, two, one)
    wa, wb = ckpt(two), ckpt(one)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    assert same_curves(logged(two), logged(one)) and any(len(r) > 1 for r in logged(one))  # per-task losses too

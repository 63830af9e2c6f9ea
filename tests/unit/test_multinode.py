"""Scale-out equations on one machine (issue 21): 2 nodes x 1 process (torchrun's c10d rendezvous on the loopback,
or `accelerate launch --num_machines 2`) == 1 process with the same global batch (and so == 1 node x 2 processes,
tests/unit/test_ddp.py); a run resumed across process counts, 1 -> 2 -> 1, == the uninterrupted run (checkpoints
hold the global step; the data order is a function of (seed, epoch) and the global batch, not of the process
count); a last step with fewer rows than processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from safetensors.torch import load_file

from tests.unit.test_ddp import LAUNCHERS, free_port


def run_ok(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(run_dir, step=None):
    steps = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    pick = steps[-1] if step is None else next(p for p in steps if int(p.name.split("-")[1]) == step)
    return load_file(str(pick / "model.safetensors"))


def worst(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def common_of(tiny_overrides) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith(("output_dir", "train.batch_size"))] + [
        "train.epochs=1", "train.eval_every=2", "train.keep_checkpoints=10"]


def node_command(launcher: str, port: int, rank: int) -> list[str]:
    if launcher == "torchrun":  # c10d rendezvous: the node ranks are assigned at start
        return ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sftlab-test", "-m", "sftlab"]
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sftlab"]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_one_process_each_equal_one_process(tiny_overrides, tmp_path, launcher):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common, port, two = common_of(tiny_overrides), free_port(), tmp_path / "two-nodes"
    args = ["train", "-", *common, "train.batch_size=4", f"output_dir={two}"]
    nodes = [subprocess.Popen([sys.executable, *node_command(launcher, port, rank), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-3000:] for o in outs]
    one = tmp_path / "one"
    run_ok(["-m", "sftlab", "train", "-", *common, "train.batch_size=8", f"output_dir={one}"], env)
    assert worst(weights(two), weights(one)) <= 1e-5
    import json

    assert json.loads((two / "summary.json").read_text())["processes"] == 2


def stopped_at(src, dst, step: int) -> None:
    """dst: src as a run stopped right after its checkpoint at `step` (later checkpoints and the results gone)."""
    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").glob("step-*"):
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    (dst / "summary.json").unlink()


def test_resume_across_process_counts_1_2_1_equals_uninterrupted(tiny_overrides, tmp_path):
    """Global batch 8 throughout: 1 process x 8 for steps 1-2, 2 processes x 4 for steps 3-4, 1 x 8 to the end.
    Log lines every 3 steps, checkpoints every 2: the open log window crosses each switch, and the logged curve is
    the uninterrupted one's."""
    from tests.unit.test_ddp import logged, same_curves

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = common_of(tiny_overrides) + ["train.log_every=3"]
    ref = tmp_path / "uninterrupted"
    run_ok(["-m", "sftlab", "train", "-", *common, "train.batch_size=8", f"output_dir={ref}"], env)
    a = tmp_path / "a"
    stopped_at(ref, a, 2)  # a one-process run stopped at step 2 (resume == uninterrupted: test_kill_resume.py)
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.batch_size=4", f"--resume={a}"], env)
    assert worst(weights(a, 4), weights(ref, 4)) <= 1e-5
    b = tmp_path / "b"
    stopped_at(a, b, 4)  # ... and that two-process run stopped at step 4
    run_ok(["-m", "sftlab", "train", "-", *common, "train.batch_size=8", f"--resume={b}"], env)
    assert worst(weights(b), weights(ref)) <= 1e-5
    assert max(int(p.name.split("-")[1]) for p in (b / "checkpoints").glob("step-*")) == 8
    assert same_curves(logged(b), logged(ref)), (logged(b), logged(ref))


def test_a_last_step_with_fewer_rows_than_processes(tiny_overrides, tmp_path):
    """65 rows at a global batch of 8: the last step holds one row, so rank 1 has none; it still joins the step's
    all-reduce (a zero-weighted pass on the step's row) and the weights equal one process's."""
    from tests.conftest import make_rows, write_jsonl

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    data = write_jsonl(tmp_path / "odd.jsonl", make_rows(65, seed=4))
    common = [o for o in common_of(tiny_overrides) if not o.startswith("data.train")] + [f"data.train={data}"]
    two, one = tmp_path / "two", tmp_path / "one"
    for strategy in ("ddp", "fsdp"):
        run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.batch_size=4",
                                                     "train.lazy_embeddings=false",
                                                     f"train.distributed.strategy={strategy}",
                                                     f"output_dir={two / strategy}"], env)
    run_ok(["-m", "sftlab", "train", "-", *common, "train.batch_size=8", "train.lazy_embeddings=false",
            f"output_dir={one}"], env)
    for strategy in ("ddp", "fsdp"):
        assert worst(weights(two / strategy), weights(one)) <= 1e-5, strategy
    import json

    assert json.loads((one / "summary.json").read_text())["steps"] == 9

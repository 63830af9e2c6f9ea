"""train.distributed.strategy: deepspeed (DeepSpeed's ZeRO engine, train/zero.py) on 2 CPU processes, over gloo
(DeepSpeed's CPU accelerator without oneCCL): ZeRO-2 and ZeRO-3 give DDP's loss curve and weights (1e-4 / 1e-5),
best/ is a plain HF folder of the full weights, a ZeRO checkpoint finishes in one process as if one process had
written it, and a DDP checkpoint resumes under ZeRO (its AdamW moments moved into the partitions). The refusals
are in test_fsdp.py's table."""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from tests.unit.test_ddp import LAUNCHERS, free_port
from tests.unit.test_fsdp import losses
from tests.unit.test_multinode import common_of, run_ok, stopped_at, weights, worst

try:
    import deepspeed  # noqa: F401
except ImportError:  # scripts/setup.sh installs it (requirements.lock); CI must not skip silently
    if os.environ.get("CI"):
        raise
    pytest.skip("deepspeed is not installed", allow_module_level=True)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _common(tiny_overrides):
    return common_of(tiny_overrides) + ["train.log_every=1", "train.batch_size=4", "train.lazy_embeddings=false"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_equals_ddp_saves_plain_folders_and_resumes_in_one_process(tiny_overrides, tmp_path, stage):
    env, common = _env(), _common(tiny_overrides)
    ds, ddp = tmp_path / "ds", tmp_path / "ddp"
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.distributed.strategy=deepspeed",
                                                 f"train.distributed.zero_stage={stage}", f"output_dir={ds}"], env)
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, f"output_dir={ddp}"], env)
    a, b = losses(ds), losses(ddp)
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    assert worst(weights(ds), weights(ddp)) <= 1e-5
    best_a, best_b = (load_file(str(d / "best" / "model.safetensors")) for d in (ds, ddp))
    assert best_a.keys() == best_b.keys() and worst(best_a, best_b) <= 1e-5
    summary = json.loads((ds / "summary.json").read_text())
    assert summary["distributed"] == "deepspeed" and summary["processes"] == 2
    assert summary["trainable_params"] == json.loads((ddp / "summary.json").read_text())["trainable_params"]

    resumed = tmp_path / "resumed"  # the ZeRO run stopped at step 4, finished by one process
    stopped_at(ds, resumed, 4)
    one = [o for o in common if o != "train.batch_size=4"] + ["train.batch_size=8"]  # the same global batch
    run_ok(["-m", "sftlab", "train", "-", *one, f"--resume={resumed}"], env)
    assert worst(weights(resumed), weights(ddp)) <= 1e-5


@pytest.mark.parametrize("stage", [2, 3])
def test_a_ddp_checkpoint_resumes_under_zero_with_accumulation(tiny_overrides, tmp_path, stage):
    """The AdamW moments of a DDP checkpoint go into ZeRO's partitions, and two micro-batches per step meet at
    DeepSpeed's accumulation boundary: the run ends where DDP's does."""
    env = _env()
    common = [o for o in _common(tiny_overrides) if o != "train.batch_size=4"] + ["train.batch_size=2",
                                                                                 "train.grad_accum=2"]
    ddp, resumed = tmp_path / "ddp", tmp_path / "resumed"
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, f"output_dir={ddp}"], env)
    stopped_at(ddp, resumed, 4)
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.distributed.strategy=deepspeed",
                                                 f"train.distributed.zero_stage={stage}", f"--resume={resumed}"], env)
    assert worst(weights(resumed), weights(ddp)) <= 1e-5


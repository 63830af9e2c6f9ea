"""train.distributed.strategy: fsdp (FSDP2 `fully_shard`) on 2 CPU processes over gloo: the same loss curve and
weights as DDP (1e-4 / 1e-5), best/ a plain HF folder of the full weights, and its checkpoints resume in one
process as if one process had written them."""
from __future__ import annotations

import json
import os

from safetensors.torch import load_file

from tests.unit.test_ddp import LAUNCHERS, free_port
from tests.unit.test_multinode import common_of, run_ok, stopped_at, weights, worst


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r
            and "split" not in r]


def test_fsdp_equals_ddp_and_saves_plain_folders(tiny_overrides, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = common_of(tiny_overrides) + ["train.log_every=1", "train.batch_size=4", "train.lazy_embeddings=false"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.distributed.strategy=fsdp",
                                                 f"output_dir={fsdp}"], env)
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, f"output_dir={ddp}"], env)
    a, b = losses(fsdp), losses(ddp)
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    assert worst(weights(fsdp), weights(ddp)) <= 1e-5
    best_a, best_b = (load_file(str(d / "best" / "model.safetensors")) for d in (fsdp, ddp))
    assert best_a.keys() == best_b.keys() and worst(best_a, best_b) <= 1e-5
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["distributed"] == "fsdp" and summary["processes"] == 2

    from sftlab.eval.evaluate import load_trained

    model, _, _ = load_trained(fsdp)  # best/ is an ordinary folder: no DTensor, no process group needed
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())

    resumed = tmp_path / "resumed"  # the fsdp run stopped at step 4, finished by one process
    stopped_at(fsdp, resumed, 4)
    one = [o for o in common if o != "train.batch_size=4"] + ["train.batch_size=8"]  # the same global batch
    run_ok(["-m", "sftlab", "train", "-", *one, f"--resume={resumed}"], env)
    assert worst(weights(resumed), weights(ddp)) <= 1e-5


import pytest  # noqa: E402


@pytest.mark.parametrize("change, message", [
    (["train.distributed.strategy=fsdp", "strategy.name=lora"], "fsdp trains strategy.name full"),
    (["train.distributed.strategy=fsdp", "train.distributed.wrap=[NoSuchLayer]"], "NoSuchLayer is not a module"),
    (["train.distributed.cpu_offload=true"], "fsdp / deepspeed setting"),
    pytest.param(["train.distributed.strategy=fsdp", "train.distributed.cpu_offload=true"], "has no GPU",
                 marks=pytest.mark.skipif("__import__('torch').cuda.is_available()")),
    (["train.distributed.strategy=deepspeed", "strategy.name=lora"], "deepspeed trains strategy.name full"),
    (["train.distributed.zero_stage=3"], "zero_stage is a deepspeed setting"),
    (["train.distributed.strategy=deepspeed", "train.distributed.zero_stage=1"], "zero_stage"),
    pytest.param(["train.distributed.strategy=deepspeed", "train.distributed.cpu_offload=true"], "has no GPU",
                 marks=pytest.mark.skipif("__import__('torch').cuda.is_available()")),
])
def test_impossible_combinations_are_one_line_before_training(tiny_overrides, capsys, change, message):
    from sftlab.cli import main

    assert main(["train", "-", *tiny_overrides, *change]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_fsdp_equals_ddp_on_a_decoder(tiny_llama_dir, tmp_path):
    """A causal LM (tied embeddings, the decoder layer as the unit): FSDP == DDP on 2 CPU processes."""
    from tests.unit.test_causal_lm_train import chat_overrides

    over = [o for o in chat_overrides.__wrapped__(tiny_llama_dir, tmp_path) if not o.startswith(
        ("output_dir", "train.batch_size", "train.epochs"))]
    common = over + ["train.epochs=1", "train.batch_size=4", "train.log_every=1", "train.lazy_embeddings=false",
                     "train.precision=fp32", "train.progress=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, "train.distributed.strategy=fsdp",
                                                 f"output_dir={fsdp}"], env)
    run_ok(LAUNCHERS["torchrun"](free_port()) + ["train", "-", *common, f"output_dir={ddp}"], env)
    a, b = losses(fsdp), losses(ddp)
    assert a and len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    assert worst(weights(fsdp), weights(ddp)) <= 1e-5

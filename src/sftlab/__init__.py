"""sftlab: supervised fine-tuning of pretrained language models.

Python API (each CLI verb is one of these):
    cfg = sftlab.load_config("configs/quickstart.yaml", ["train.epochs=1"])
    run_dir = sftlab.train(cfg)
    sftlab.evaluate_file(run_dir, "dev.jsonl")
"""
import os as _os

__version__ = "0.1.0"

# accelerate imports DeepSpeed whenever it is installed (sftlab installs it for train.distributed.strategy:
# deepspeed), and DeepSpeed, finding no CUDA, logs a warning per process on *stdout*, the channel whose last line is
# the run directory. Naming its accelerator on machines without an NVIDIA driver silences it (with one, DeepSpeed
# detects CUDA quietly); DS_ACCELERATOR set by the user wins.
if "DS_ACCELERATOR" not in _os.environ and not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ["DS_ACCELERATOR"] = "cpu"


def __getattr__(name):  # lazy: `import sftlab` stays fast, torch loads on first use
    if name in ("load_config", "dump_config"):
        from . import config

        return getattr(config, name)
    if name == "train":
        from .train.loop import train

        return train
    if name in ("evaluate_file", "predict_file", "load_trained"):
        from .eval import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)

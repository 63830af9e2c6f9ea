"""sftlab: supervised fine-tuning of pretrained language models.

Python API (each CLI verb is one of these):
    cfg = sftlab.load_config("configs/quickstart.yaml", ["train.epochs=1"])
    run_dir = sftlab.train(cfg)
    sftlab.evaluate_file(run_dir, "dev.jsonl")
"""
__version__ = "0.1.0"


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

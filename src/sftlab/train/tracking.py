"""Experiment tracking: TensorBoard event files in every run directory, MLflow when `train.mlflow_uri` is set.

The loop's metrics.jsonl stays the source of truth; trackers mirror its records. On resume TensorBoard purges
events past the checkpoint's step (a crash may have logged steps that are now replayed), and MLflow continues
the same run (its id is kept in RUN_DIR/mlflow.json).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


class Tracker:
    def __init__(self, run_dir: Path, cfg, *, resume_step: int | None, enabled: bool):
        self.tb = self.mlflow = None
        if not enabled:
            return
        t = cfg.train
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            self.tb.add_text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```", 0)
        if t.mlflow_uri:
            self.mlflow = _start_mlflow(run_dir, cfg)

    def log(self, record: dict) -> None:
        step = record["step"]
        split = record.get("split", "train")
        values = {f"{split}/{k}": float(v) for k, v in record.items()
                  if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow:
            # MLflow metric names may not hold "/" on every store; "." reads the same.
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self, summary: dict | None = None) -> None:
        if self.tb:
            self.tb.close()
        if self.mlflow:
            if summary:
                flat = {f"summary.{k}": float(v) for k, v in summary.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.mlflow.log_metrics(flat)
            self.mlflow.end_run()


def _start_mlflow(run_dir: Path, cfg):
    try:
        import mlflow
    except ImportError:
        raise ConfigError("train.mlflow_uri is set but MLflow is not installed; pip install 'sftlab[mlflow]' "
                          "(or mlflow-skinny), or remove train.mlflow_uri") from None
    mlflow.set_tracking_uri(cfg.train.mlflow_uri)
    mlflow.set_experiment(cfg.train.mlflow_experiment)
    ids = run_dir / "mlflow.json"
    run_id = json.loads(ids.read_text())["run_id"] if ids.is_file() else None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
    if run_id is None:
        ids.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": cfg.train.mlflow_uri}))
        params = {f"{sec}.{k}": v for sec in ("model", "data", "strategy", "objective", "train")
                  for k, v in cfg.model_dump(mode="json")[sec].items() if v is not None}
        # Params only, no artifacts: with a sqlite store MLflow would put artifacts in ./mlruns of whatever
        # directory the user ran from. The full config stays in RUN_DIR/config.yaml.
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()} | {"task": cfg.task, "run_dir": str(run_dir)})
    return mlflow

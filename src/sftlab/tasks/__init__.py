"""Tasks: what a model outputs, how its batches are built and weighed, how it is scored. One `TaskSpec` each.

The task is decided once, here (shared/design/fusion-architecture.md W1): the loop, evaluation, model loading,
export and serving ask `task_spec(cfg.task)` for the model class and head, the collate function, the loss units per
row, the loss, the evaluation and the metrics (with their direction) instead of branching on the task string.
Registered: classification and regression (sequence.py), causal_lm (causal_lm.py). A new task is one file with one
`tasks.register` line (docs/contributing.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import tasks


@dataclass(frozen=True)
class TaskSpec:
    name: str
    decoder: bool
    """A causal LM (AutoModelForCausalLM: generates, judged by what it generates); else a head on an encoder."""
    head_kwargs: Callable[[list[str] | None], dict]
    """(labels) -> from_pretrained kwargs that shape the head (num_labels, id2label, problem_type)."""
    loss: Callable[[Any, dict], tuple[Any, Any]]
    """(model, batch) -> (SUM of the loss over the batch's loss units, logits): the loop divides by the step's units."""
    collate: Callable[[Any, list[int], int, int], dict]
    """(encoded data, row ids, pad id, pad multiple) -> batch tensors."""
    units: Callable[[Any], list]
    """(encoded data) -> loss units per row: 1 per example, or its loss tokens (causal LM)."""
    examples: Callable[[Any], list]
    """(encoded data) -> examples per row (packed causal-LM rows hold several)."""
    evaluate: Callable[..., dict]
    """(model, encoded, *, batch_size, pad_id, device, bf16, max_tokens, pad_multiple) -> scores incl. loss."""
    metrics: dict[str, bool]
    """name -> higher is better; the first is the default `train.metric`."""

    def auto_model(self):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        return AutoModelForCausalLM if self.decoder else AutoModelForSequenceClassification

    @property
    def default_metric(self) -> str:
        return next(iter(self.metrics))


def task_spec(name: str) -> TaskSpec:
    from . import causal_lm, sequence  # noqa: F401  (registers the tasks)

    return tasks.get(name)

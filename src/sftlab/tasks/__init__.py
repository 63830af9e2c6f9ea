"""Tasks: what a model outputs, how its batches are built and weighed, how it is scored. One `TaskSpec` each.

The task is decided once, here (shared/design/fusion-architecture.md W1): the loop, evaluation, model loading,
export and serving ask `task_spec(cfg.task)` for the model class and head, the collate function, the loss units per
row, the loss, the evaluation and the metrics (with their direction) instead of branching on the task string.
Registered: classification and regression (sequence.py), causal_lm (causal_lm.py), masked_lm (masked_lm.py),
embedding (embedding.py), multitask (multitask.py). A new task is one file with one
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
    collate: Callable[..., dict]
    """(encoded data, row ids, pad id, pad multiple, epoch=0) -> batch tensors (the epoch: masks drawn per epoch)."""
    units: Callable[[Any], list]
    """(encoded data) -> loss units per row: 1 per example, or its loss tokens (causal LM)."""
    examples: Callable[[Any], list]
    """(encoded data) -> examples per row (packed causal-LM rows hold several)."""
    evaluate: Callable[..., dict]
    """(model, encoded, *, batch_size, pad_id, device, bf16, max_tokens, pad_multiple) -> scores incl. loss."""
    metrics: dict[str, bool]
    """name -> higher is better; the first is the default `train.metric`."""
    auto: str = ""
    """transformers Auto class of the model; default: AutoModelForCausalLM for decoders, else
    AutoModelForSequenceClassification."""
    head_reads_first_token: bool = True
    """An encoder head that reads position 0 only (classifiers): the last block may skip the other positions."""
    step_units: Callable[[Any, list[int], int], int] | None = None
    """(encoded data, row ids, epoch) -> loss units of those rows, for tasks whose units change per epoch (masked LM:
    the masks are drawn per epoch); None: the fixed per-row `units`."""
    after_load: Callable[..., None] | None = None
    """(model, folder, missing keys, training data or None, labels=...) after from_pretrained: initialise what the
    checkpoint lacked (an MLM head), or reshape the head (multitask's heads)."""

    def auto_model(self):
        import transformers

        name = self.auto or ("AutoModelForCausalLM" if self.decoder else "AutoModelForSequenceClassification")
        return getattr(transformers, name)

    @property
    def default_metric(self) -> str:
        return next(iter(self.metrics))


def task_spec(name: str) -> TaskSpec:
    from . import causal_lm, embedding, masked_lm, multitask, sequence  # noqa: F401  (registers the tasks)

    return tasks.get(name)

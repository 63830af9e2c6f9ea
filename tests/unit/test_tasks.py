"""The task registry (tasks/): every task answers what the loop, evaluation and loading ask, and the metric
directions agree with the best-model rule (eval/metrics.is_better)."""
from __future__ import annotations

import pytest

from sftlab.eval.metrics import is_better
from sftlab.registry import tasks
from sftlab.tasks import TaskSpec, task_spec

NAMES = ("classification", "regression", "causal_lm")


def test_every_task_is_registered_once_with_a_whole_spec():
    task_spec("classification")  # imports the task modules
    assert set(NAMES) <= set(tasks.names())
    for name in tasks.names():
        spec = task_spec(name)
        assert isinstance(spec, TaskSpec) and spec.name == name and spec.metrics
        assert spec.default_metric == next(iter(spec.metrics))


@pytest.mark.parametrize("name", NAMES)
def test_metric_directions_match_the_best_model_rule(name):
    for metric, higher in task_spec(name).metrics.items():
        assert is_better(metric, 2.0, 1.0) is higher, metric


def test_heads_and_model_classes():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert task_spec("classification").head_kwargs(["a", "b"])["id2label"] == {0: "a", 1: "b"}
    assert task_spec("regression").head_kwargs(None) == {"num_labels": 1, "problem_type": "regression"}
    assert task_spec("causal_lm").auto_model() is AutoModelForCausalLM
    assert task_spec("regression").auto_model() is AutoModelForSequenceClassification


def test_an_unknown_task_is_a_config_error_with_a_suggestion():
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'regression'"):
        task_spec("regresion")

"""The one small name -> component registry (PEFT's `register_peft_method`, lm-eval's registries).

Only leaves are registered (strategies, tasks, training objectives); the loop is a direct import.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str):
        self.kind, self.config_key, self._items = kind, config_key, {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{self.config_key}: unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


strategies: Registry = Registry("strategy", "strategy.name")
tasks: Registry = Registry("task", "task")  # TaskSpec per task (tasks/): model head, collate, units, loss, evaluation
# How the training loss is formed from the task loss, extra models and data (sft, distill): classes with a Config.
training_objectives: Registry = Registry("objective", "objective.name")

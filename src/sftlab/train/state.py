"""The training loop's state that travels in checkpoints (state.json), typed.

`LoopState.from_json` reads every checkpoint format sftlab has written: fields added later (bad_steps and
skipped_steps with the non-finite guard, window_parts and frozen with the objectives, streams with the unlabelled
stream) take their defaults, so the wave-1 checkpoints still resume (tests/unit/test_train_equations.py). `to_json`
writes the same keys as before, so older sftlab versions read the new files too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class LoopState:
    epoch: int = 0
    step_in_epoch: int = 0
    best: float | None = None
    best_step: int | None = None
    best_scores: dict | None = None
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    bad_steps: int = 0  # non-finite steps in a row (train.max_bad_steps)
    skipped_steps: int = 0
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float | None = None
    streams: dict[str, list[int]] = field(default_factory=dict)  # [epoch, step in epoch] per stream beyond "train"
    window: list | None = None  # the open log window at the checkpoint: [loss, examples, units, seconds]
    window_parts: dict[str, float] = field(default_factory=dict)
    grad_accum: int | None = None  # what train.auto_batch_size settled on
    frozen: dict[str, str] | None = None  # fingerprints of the objective's frozen models (a teacher)
    stopped_early: bool = False

    @classmethod
    def from_json(cls, raw: dict) -> "LoopState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.streams:
            del out["streams"]
        return out


@dataclass
class Window:
    """Sums since the last logged line. The loss stays on the device: no host sync per step, only per line."""
    loss: torch.Tensor
    examples: int = 0
    units: int = 0
    seconds: float = 0.0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's named parts (distill: hard, soft)

    @classmethod
    def open(cls, state: LoopState, device) -> "Window":
        """Empty, or the window a checkpoint carried (a resumed run logs exactly what it would have)."""
        if state.window is None:
            return cls(torch.zeros((), device=device))
        loss, examples, units, seconds = state.window
        return cls(torch.tensor(loss, device=device), examples, units, seconds,
                   {k: torch.tensor(v, device=device) for k, v in state.window_parts.items()})

    def save_into(self, state: LoopState) -> None:
        state.window = [float(self.loss), self.examples, self.units, self.seconds]
        state.window_parts = {k: float(v) for k, v in self.parts.items()}

    def reset(self) -> None:
        self.loss.zero_()
        self.examples, self.units, self.seconds, self.parts = 0, 0, 0.0, {}

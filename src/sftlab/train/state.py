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
    def open(cls, state: LoopState, device, main: bool = True) -> "Window":
        """Empty, or the window a checkpoint carried (a resumed run logs exactly what it would have). The carried
        sums are the whole batch's (collapse()): rank 0 holds them, the other ranks start from zero."""
        if state.window is None or not main:
            return cls(torch.zeros((), device=device))
        loss, examples, units, seconds = state.window
        return cls(torch.tensor(loss, device=device), examples, units, seconds,
                   {k: torch.tensor(v, device=device) for k, v in state.window_parts.items()})

    def collapse(self, num_processes: int, main: bool) -> None:
        """Before a log line or a checkpoint: the loss sums of every process, summed into rank 0's window (the
        others' become 0), so the logged loss is the global batch's mean whatever the process count (it was rank
        0's rows' mean: 2 processes logged a curve 0.02 off one process's with the same weights). One all-reduce
        per log line. `units/` parts count the whole batch already and stay."""
        if num_processes == 1:
            return
        names = sorted(k for k in self.parts if not k.startswith("units/"))
        flat = torch.stack([self.loss.float(), *(torch.as_tensor(self.parts[k], device=self.loss.device).float()
                                                 for k in names)])
        torch.distributed.all_reduce(flat)
        if not main:
            flat.zero_()
        self.loss = flat[0].clone()
        for k, v in zip(names, flat[1:]):
            self.parts[k] = v.clone()

    def save_into(self, state: LoopState) -> None:
        state.window = [float(self.loss), self.examples, self.units, self.seconds]
        state.window_parts = {k: float(v) for k, v in self.parts.items()}

    def reset(self) -> None:
        self.loss.zero_()
        self.examples, self.units, self.seconds, self.parts = 0, 0, 0.0, {}

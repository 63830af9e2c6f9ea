"""train/state.py: the typed loop state round-trips through state.json and reads every older checkpoint's."""
from __future__ import annotations

import torch

from sftlab.train.state import LoopState, Window


def test_round_trip_and_old_checkpoints():
    s = LoopState(epoch=2, step_in_epoch=5, best=0.9, best_step=40, best_scores={"accuracy": 0.9}, examples=320,
                  streams={"unlabelled": [1, 3]}, window=[1.5, 8, 8, 0.2], window_parts={"soft": 0.5},
                  grad_accum=2, frozen={"teacher": "abc"})
    assert LoopState.from_json(s.to_json()) == s
    wave1 = {"epoch": 1, "step_in_epoch": 0, "best": 0.5, "best_step": 10, "bad_evals": 0, "examples": 80,
             "tokens": 900, "train_seconds": 3.0, "last_loss": 0.7, "window": [0.0, 0, 0, 0.0], "grad_accum": 1,
             "some_future_key": 1}
    old = LoopState.from_json(wave1)
    assert (old.bad_steps, old.skipped_steps, old.frozen, old.streams, old.window_parts) == (0, 0, None, {}, {})
    assert "streams" not in old.to_json()  # a run without extra streams writes the keys it always wrote


def test_window_travels_with_the_state():
    state = LoopState()
    w = Window.open(state, "cpu")
    w.loss += torch.tensor(2.5)
    w.examples, w.units, w.seconds, w.parts = 4, 4, 0.5, {"hard": torch.tensor(1.0)}
    w.save_into(state)
    again = Window.open(state, "cpu")
    assert float(again.loss) == 2.5 and (again.examples, again.units, again.seconds) == (4, 4, 0.5)
    assert float(again.parts["hard"]) == 1.0
    loss = w.loss
    w.reset()
    assert w.loss is loss and float(loss) == 0 and w.parts == {} and w.units == 0

"""No code runs from files (issue 7): state lives in safetensors + JSON, nothing is unpickled, and
`trust_remote_code` stays off unless model.trust_remote_code is set.

A live pickle payload (unpickling it runs `touch MARKER`) is planted under every name a pickled state file has in
HF/PyTorch run folders; resume, eval and predict must never create the marker, nor call torch.load or pickle.
"""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.train.loop import train

STATE_NAMES = ["optimizer.pt", "rng.pth", "training_args.bin", "scheduler.pt", "pytorch_model.bin",
               "rng_state.pth", "trainer_state.pt"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def plant(folder, marker) -> list:
    planted = []
    for name in STATE_NAMES:
        torch.save(Payload(marker), folder / name)  # torch's zip format; torch.load(weights_only=False) runs it
        planted.append(folder / name)
    (folder / "state.pkl").write_bytes(pickle.dumps(Payload(marker)))  # and a bare pickle
    return planted + [folder / "state.pkl"]


def test_the_payload_is_live(tmp_path):
    """Guard against a vacuous test: unpickling the planted file does create the marker."""
    marker = tmp_path / "PWNED"
    plant(tmp_path, marker)
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert marker.exists()


def test_resume_eval_predict_never_unpickle(tiny_overrides, toy_data, tmp_path, monkeypatch, capsys):
    overrides = tiny_overrides + ["train.epochs=1", "train.eval_every=4", "train.num_threads=1",
                                  "train.tensorboard=false"]
    cfg = load_config(None, overrides)
    run_dir = train(cfg, on_eval=lambda step, scores: step >= 4)  # stops after the step-4 checkpoint
    ckpt = run_dir / "checkpoints" / "step-0000004"
    assert (ckpt / "COMPLETE").is_file() and not (run_dir / "checkpoints" / "step-0000008").exists()
    marker = tmp_path / "PWNED"
    planted = plant(ckpt, marker) + plant(run_dir / "best", marker) + plant(run_dir, marker)

    calls = []
    real_torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(("torch.load", a)) or real_torch_load(*a, **k))
    for name in ("load", "loads"):
        real = getattr(pickle, name)
        monkeypatch.setattr(pickle, name, lambda *a, _real=real, _name=name, **k:
                            calls.append((f"pickle.{_name}", a)) or _real(*a, **k))
    monkeypatch.setattr(pickle, "Unpickler", None)  # anything reaching for it fails loudly

    assert main(["train", "-", *overrides, "--resume", str(run_dir)]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "step-0000008" / "COMPLETE").is_file()
    plant(run_dir / "best", marker)  # the resumed run rewrote best/: plant again before eval and predict
    assert main(["eval", str(run_dir), "--data", toy_data["dev"], "--fp32"]) == 0
    assert main(["predict", str(run_dir), "--data", toy_data["dev"], "--fp32"]) == 0
    assert not marker.exists()
    assert calls == []
    assert all(p.exists() for p in planted if p.parent != ckpt)  # nothing was "cleaned up" by loading it either


def spy_from_pretrained(monkeypatch) -> list:
    seen = []
    for cls in (AutoTokenizer, AutoConfig, AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def spy(*a, _real=real, _cls=cls.__name__, **k):
            seen.append((_cls, k.get("trust_remote_code", False)))
            return _real(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return seen


@pytest.mark.parametrize("setting", [None, "false", "true"])
def test_trust_remote_code_only_when_the_config_says_so(tiny_overrides, toy_data, tmp_path, monkeypatch, setting):
    seen = spy_from_pretrained(monkeypatch)
    extra = [f"model.trust_remote_code={setting}"] if setting else []
    run_dir = train(load_config(None, tiny_overrides + extra + ["train.max_steps=1", "train.num_threads=1",
                                                                "train.tensorboard=false"]))
    assert {cls for cls, _ in seen} >= {"AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(trust is (setting == "true") for _, trust in seen), seen
    seen.clear()
    assert main(["eval", str(run_dir), "--data", toy_data["dev"], "--fp32"]) == 0  # eval never trusts remote code
    assert seen and not any(trust for _, trust in seen), seen
    shutil.rmtree(run_dir)

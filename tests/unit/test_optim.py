"""AdamW groups (no decay on biases and norms, frozen params nowhere) and the warmup + decay schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sftlab.config import TrainConfig
from sftlab.train.optim import build_optimizer, build_schedule, no_decay, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.LayerNorm = nn.LayerNorm(8)
        self.rms_norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 3, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(8))  # 1-D: treated like a norm scale
        self.norm2d = nn.Parameter(torch.ones(2, 8))  # 2-D, but a norm by name


def names_of(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def check_groups(model, groups, weight_decay, expect_skip, expect_decay):
    decay, skip = groups
    assert decay["weight_decay"] == weight_decay and skip["weight_decay"] == 0.0
    assert names_of(model, decay) == expect_decay
    assert names_of(model, skip) == expect_skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names_of(model, decay) | names_of(model, skip) == trainable  # nothing trainable left out
    assert len(decay["params"]) + len(skip["params"]) == len(trainable)  # nothing twice


def test_toy_groups():
    model = Toy()
    check_groups(
        model,
        param_groups(model, 0.1, 1e-3),
        0.1,
        expect_skip={"proj.bias", "LayerNorm.weight", "LayerNorm.bias", "rms_norm.weight", "scale", "norm2d"},
        expect_decay={"embed.weight", "proj.weight", "head.weight"},
    )


def test_bert_groups(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config)
    names = {n for n, _ in model.named_parameters()}
    skip = {n for n in names if n.endswith(".bias") or "LayerNorm" in n}
    decay = names - skip
    assert any("LayerNorm.weight" in n for n in skip) and "classifier.bias" in skip
    assert "classifier.weight" in decay and "bert.embeddings.word_embeddings.weight" in decay
    assert all(dict(model.named_parameters())[n].ndim == 2 for n in decay)  # every decayed tensor is a matrix
    check_groups(model, param_groups(model, 0.01, 1e-3), 0.01, skip, decay)

    # head_only: the frozen backbone is in neither group.
    from sftlab.strategies.basic import head_only

    from sftlab.config import StrategyConfig

    head_only(model, StrategyConfig(name="head_only"), None)
    head = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head == {"classifier.weight", "classifier.bias"}
    check_groups(model, param_groups(model, 0.01, 1e-3), 0.01, skip & head, decay & head)


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("encoder.layer.0.attention.self.query.weight", (4, 4), False),
        ("encoder.layer.0.attention.self.query.bias", (4,), True),
        ("encoder.layer.0.output.LayerNorm.weight", (4,), True),
        ("model.layers.0.input_layernorm.weight", (4,), True),
        ("model.norm.weight", (4,), True),
        ("odd.norm_scale", (2, 4), True),
        ("lm.bias", (2, 4), True),
        ("conv.weight", (2, 3, 4), False),
        ("scalar", (), True),
    ],
)
def test_no_decay_rule(name, shape, expected):
    assert no_decay(name, torch.zeros(shape)) is expected


def test_optimizer_applies_decay_only_to_decay_group():
    torch.manual_seed(0)
    model = Toy()
    cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None  # zero gradients: only decay moves weights
    opt.step()
    after = dict(model.named_parameters())
    for n, p in after.items():
        if not p.requires_grad:
            assert torch.equal(p, before[n])
        elif no_decay(n, p):
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))  # decoupled: w <- w (1 - lr wd)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1] and opt.defaults["betas"] == (0.9, 0.999)


# --- schedule -----------------------------------------------------------------------------------------------


def lrs(schedule: str, total: int, peak: float = 1.0, **kw) -> list[float]:
    """The lr used by optimizer steps 0..total-1, then the lr after the last step (scheduler stepped `total` times)."""
    cfg = TrainConfig(lr=peak, schedule=schedule, **kw)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_schedule(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out + [opt.param_groups[0]["lr"]]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [1, 4, 10])
def test_warmup_rises_linearly_to_peak(schedule, warmup):
    peak = 2e-3
    lr = lrs(schedule, 50, peak=peak, warmup_steps=warmup)
    rising = lr[: warmup + 1]
    steps = [b - a for a, b in zip(rising, rising[1:])]
    assert all(s > 0 for s in steps)
    assert max(steps) - min(steps) < 1e-12  # equal increments: linear
    assert rising[0] > 0  # the first step already learns
    assert rising[-1] == pytest.approx(peak)  # first step after warmup is at the peak
    assert max(lr) == pytest.approx(peak)


def test_warmup_ratio_sets_warmup_length():
    lr = lrs("constant", 100, warmup_ratio=0.1)
    assert lr[9] < 1.0 and lr[10] == 1.0 and lr[:10] == sorted(lr[:10])
    assert lrs("constant", 100, warmup_ratio=0.0)[:3] == [1.0, 1.0, 1.0]
    assert lrs("constant", 100, warmup_ratio=0.1) == lrs("constant", 100, warmup_steps=10)


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_decays_to_zero_at_the_end(warmup):
    total = 20
    lr = lrs("linear", total, warmup_steps=warmup)
    decay = lr[warmup:]
    assert decay[0] == pytest.approx(1.0) and lr[total] == 0.0
    diffs = [b - a for a, b in zip(decay, decay[1:])]
    assert all(d == pytest.approx(-1 / (total - warmup)) for d in diffs)  # straight line to 0 after the last step
    assert lr[total - 1] == pytest.approx(1 / (total - warmup))  # the last step still learns a little


@pytest.mark.parametrize("warmup", [0, 5])
def test_cosine_ends_at_zero(warmup):
    total = 40
    lr = lrs("cosine", total, warmup_steps=warmup)
    decay = lr[warmup:]
    assert decay[0] == pytest.approx(1.0) and lr[total] == pytest.approx(0.0, abs=1e-12)
    assert all(b < a for a, b in zip(decay, decay[1:]))
    mid = warmup + (total - warmup) // 2
    assert lr[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warmup) / (total - warmup))))
    assert lr[mid] == pytest.approx(0.5, abs=0.05)


def test_constant_stays_at_peak():
    assert lrs("constant", 30, peak=3e-4, warmup_steps=0) == [3e-4] * 31
    lr = lrs("constant", 30, peak=3e-4, warmup_steps=5)
    assert lr[5:] == [3e-4] * 26


def test_schedule_never_goes_negative_past_the_end():
    cfg = TrainConfig(lr=1.0, schedule="linear", warmup_steps=2)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, cfg, 10)
    for _ in range(15):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] >= 0.0

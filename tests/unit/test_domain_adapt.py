"""Domain adaptation objectives (objectives/mmd.py, dann.py, udalm.py) as equations: MMD's properties, gradient reversal,
weight 0 == plain SFT bit for bit, resume == uninterrupted with both streams, and the bad inputs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import crash_after_checkpoint, make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def target_file(tmp_path):
    rows = [{"text": r["text"].replace("the ", "a tiny ") + " indeed"} for r in make_rows(24, seed=5)]
    return write_jsonl(tmp_path / "target.jsonl", rows)


def _weights(run):
    return load_file(str(run / "best" / "model.safetensors"))


def test_mmd_is_zero_on_identical_samples_nonnegative_symmetric_and_grows_with_a_shift():
    from sftlab.objectives.domain import mmd2

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 8, generator=g), torch.randn(110, 8, generator=g)  # unequal sizes
    assert abs(float(mmd2(x, x))) < 1e-6
    assert float(mmd2(x, y)) >= 0 and torch.allclose(mmd2(x, y), mmd2(y, x), atol=1e-6)
    values = [float(mmd2(x, y + shift)) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 5 * values[0]


def test_gradient_reversal_flips_exactly_the_domain_gradient_into_the_encoder(tiny_model_dir):
    from sftlab.models import load_model
    from sftlab.objectives.domain import HeadInput, reverse_gradient

    model = load_model(str(tiny_model_dir), "classification", ["a", "b"])
    ids = torch.randint(5, 1000, (6, 9), generator=torch.Generator().manual_seed(0))
    domain = torch.tensor([0, 0, 0, 1, 1, 1.0])
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    grads = []
    for coefficient in (None, 0.3):
        model.zero_grad()
        clf.zero_grad()
        with HeadInput(model) as f:
            model(input_ids=ids)
        feats = f.value if coefficient is None else reverse_gradient(f.value, coefficient)
        torch.nn.functional.binary_cross_entropy_with_logits(clf(feats).squeeze(-1), domain).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      [p.grad.clone() for p in clf.parameters()]))
    (enc_plain, clf_plain), (enc_rev, clf_rev) = grads
    assert enc_plain and enc_plain.keys() == enc_rev.keys()
    for n in enc_plain:
        torch.testing.assert_close(enc_rev[n], -0.3 * enc_plain[n])
    for a, b in zip(clf_plain, clf_rev):
        assert torch.equal(a, b)  # the domain classifier itself learns at full strength


def test_mmd_weight_ramps_as_dann_reversal_and_ramp_false_is_constant():
    from types import SimpleNamespace

    from sftlab.objectives.mmd import MMD, MMDConfig

    data = SimpleNamespace(splits={"train": SimpleNamespace(examples=[0] * 4)})
    ramped = MMD(SimpleNamespace(objective=MMDConfig(weight=0.5)), data, None, None)
    flat = MMD(SimpleNamespace(objective=MMDConfig(weight=0.5, ramp=False)), data, None, None)
    seen = []
    for step in (0, 10, 50, 100):
        ramped.on_step(step, 100)
        flat.on_step(step, 100)
        seen.append(ramped.coefficient)
        assert flat.coefficient == 1.0
    assert seen[0] == 0.0 and seen == sorted(seen) and seen[-1] > 0.999
    assert abs(seen[1] - (2 / (1 + torch.e ** -1) - 1)) < 1e-12


@pytest.mark.parametrize("name", ["mmd", "dann", "udalm"])
def test_weight_zero_is_plain_sft_bit_for_bit(tiny_overrides, target_file, tmp_path, name):
    import sftlab

    sft = sftlab.train(sftlab.load_config(None, tiny_overrides + [f"output_dir={tmp_path / 'sft'}"]))
    zero = sftlab.train(sftlab.load_config(None, tiny_overrides + [
        f"objective.name={name}", "objective.weight=0", f"data.unlabelled={target_file}",
        f"output_dir={tmp_path / name}"]))
    a, b = _weights(sft), _weights(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["mmd", "dann", "udalm"])
def test_resume_with_both_streams_equals_uninterrupted_and_logs_parts(tiny_overrides, target_file, tmp_path,
                                                                     monkeypatch, name):
    import json

    import sftlab
    import sftlab.train.loop as loop

    # 64 labelled rows / batch 8 = 8 steps an epoch; 24 target rows = 3: the streams are in different epochs
    common = tiny_overrides + [f"objective.name={name}", f"data.unlabelled={target_file}", "train.eval_every=3"]
    full = sftlab.train(sftlab.load_config(None, common + [f"output_dir={tmp_path / 'full'}"]))
    cfg = sftlab.load_config(None, common + [f"output_dir={tmp_path / 'cut'}"])
    real = crash_after_checkpoint(monkeypatch, step=9)
    with pytest.raises(KeyboardInterrupt):
        sftlab.train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cut = sftlab.train(cfg, resume=tmp_path / "cut")
    a, b = _weights(full), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    part = {"mmd": "loss/mmd", "dann": "loss/domain", "udalm": "loss/mlm"}[name]
    assert any(part in r and r[part] > 0 and "loss/task" in r for r in logged)


def test_mmd_training_pulls_the_domains_together(tiny_overrides, target_file, tmp_path):
    """With a large weight the source and target features end closer (in MMD) than after source-only training."""
    import sftlab
    from sftlab.data.prepare import prepare
    from sftlab.eval.evaluate import load_trained
    from sftlab.objectives.domain import HeadInput, mmd2

    def gap(run):
        model, tok, _ = load_trained(run)
        cfg = sftlab.load_config(None, tiny_overrides + [f"data.unlabelled={target_file}", "objective.name=mmd"])
        enc = prepare(cfg, tok).encoded
        feats = []
        for part in ("train", "unlabelled"):
            ids = enc[part].input_ids[:24]
            width = max(map(len, ids))
            batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
            with torch.no_grad(), HeadInput(model) as f:
                model(input_ids=batch, attention_mask=(batch != 0).long())
            feats.append(f.value)
        return float(mmd2(*feats))

    plain = sftlab.train(sftlab.load_config(None, tiny_overrides + [f"output_dir={tmp_path / 'plain'}"]))
    adapted = sftlab.train(sftlab.load_config(None, tiny_overrides + [
        "objective.name=mmd", "objective.weight=10", f"data.unlabelled={target_file}", f"output_dir={tmp_path / 'm'}"]))
    assert gap(adapted) < gap(plain)


def test_bad_inputs_one_line(tiny_overrides, target_file, tmp_path, toy_data):
    import sftlab
    from sftlab.errors import ConfigError, DataError

    def run(*extra):
        return sftlab.train(sftlab.load_config(None, tiny_overrides + list(extra)))

    with pytest.raises(ConfigError, match="set data.unlabelled"):
        run("objective.name=mmd")
    with pytest.raises(ConfigError, match="is the training file"):
        run("objective.name=dann", f"data.unlabelled={toy_data['train']}")
    with pytest.raises(Exception, match="objective.weight must be >= 0"):
        sftlab.load_config(None, tiny_overrides + ["objective.name=mmd", "objective.weight=-1"])
    with pytest.raises(Exception, match="objective.classifier_lr_scale must be > 0"):
        sftlab.load_config(None, tiny_overrides + ["objective.name=dann", "objective.classifier_lr_scale=0"])
    with pytest.raises(Exception, match="objective.gamma"):
        sftlab.load_config(None, tiny_overrides + ["objective.name=dann", "objective.gamma=-1"])
    with pytest.raises(Exception, match="Unknown key|unknown key|did you mean"):
        sftlab.load_config(None, tiny_overrides + ["objective.name=mmd", "objective.gamma=3"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        run("objective.name=mmd", f"data.unlabelled={empty}", f"output_dir={tmp_path / 'e'}")


@pytest.mark.parametrize("name,extra", [("dann", "domain_classifier.0.weight"), ("udalm", "mlm_head.bias")])
def test_trains_on_two_processes(tiny_overrides, target_file, tmp_path, name, extra):
    """Not equal to one process (per-micro-batch statistics, domain.py), but it runs: the extras' gradients are
    averaged by hand outside DDP (UDALM's head also reads the DDP model's word embeddings)."""
    import os
    import subprocess
    import sys

    from tests.unit.test_ddp import LAUNCHERS, free_port

    common = [o for o in tiny_overrides if not o.startswith(("output_dir", "train.batch_size"))] + ["train.epochs=1"]
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, *LAUNCHERS["torchrun"](free_port()), "train", "-", *common,
                           "train.batch_size=4", f"objective.name={name}", f"data.unlabelled={target_file}",
                           f"output_dir={out}"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert extra in load_file(str(ckpt / "extras.safetensors"))


def test_udalm_masks_only_target_rows_and_its_mlm_term_is_the_mean_of_row_means(tiny_overrides, target_file):
    """One micro-batch by hand: source rows reach the model unmasked, target rows masked as masked_lm masks them,
    and loss/mlm equals the mean over target rows of each row's mean cross-entropy per masked token."""
    import sftlab
    from sftlab.data.prepare import prepare
    from sftlab.models import load_model, load_tokenizer
    from sftlab.objectives.udalm import UDALM
    from sftlab.tasks import task_spec
    from sftlab.tasks.masked_lm import draw

    cfg = sftlab.load_config(None, tiny_overrides + ["objective.name=udalm", f"data.unlabelled={target_file}"])
    tok = load_tokenizer(cfg.model.name)
    data = prepare(cfg, tok)
    from sftlab.data.batches import join

    joined = join(data.encoded["train"], data.encoded["unlabelled"])
    spec = task_spec("classification")
    model = load_model(cfg.model.name, "classification", data.labels.names)
    obj = UDALM(cfg, data, spec.loss, tok)
    obj.on_step(3, 10)
    rows = [0, 1, 2, 64, 65, 66]
    batch = spec.collate(joined, rows, tok.pad_token_id)
    seen = {}
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.update(ids=k["input_ids"].clone()), with_kwargs=True)
    out = obj(model, batch, rows, {"train": 3, "unlabelled": 3})
    handle.remove()
    assert torch.equal(seen["ids"][:3], batch["input_ids"][:3])
    per_row = []
    for r, row in enumerate(rows[3:], start=3):
        pos, shown, orig = draw(obj.target, row - 64, 3)
        assert torch.equal(seen["ids"][r, torch.from_numpy(pos)], torch.from_numpy(shown))
        with torch.no_grad():
            h = model(input_ids=seen["ids"][r:r + 1], attention_mask=batch["attention_mask"][r:r + 1],
                      output_hidden_states=True).hidden_states[-1][0, torch.from_numpy(pos)]
            logits = obj.head(h, model.get_input_embeddings().weight)
        per_row.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(orig)))
    torch.testing.assert_close(out.parts["mlm"], torch.stack(per_row).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mmd", "dann", "udalm"])
def test_streams_apart_equal_one_joined_forward(tiny_overrides, target_file, name):
    """The loop collates source and target rows apart (two forwards, each padded to its own longest row) for speed:
    loss parts and every gradient equal the one joined forward's, with the first-token last block on (udalm's target
    forward must take the full block for its hidden states)."""
    import sftlab
    from sftlab.data.batches import join
    from sftlab.data.prepare import prepare
    from sftlab.models import load_model, load_tokenizer
    from sftlab.models.first_token import enable_first_token_last_layer
    from sftlab.registry import training_objectives
    from sftlab.tasks import task_spec

    cfg = sftlab.load_config(None, tiny_overrides + [f"objective.name={name}", f"data.unlabelled={target_file}"])
    tok = load_tokenizer(cfg.model.name)
    data = prepare(cfg, tok)
    joined = join(data.encoded["train"], data.encoded["unlabelled"])
    spec = task_spec("classification")
    model = load_model(cfg.model.name, "classification", data.labels.names)
    obj = training_objectives.get(name)(cfg, data, spec.loss, tok)
    obj.on_step(3, 10)
    n = len(data.encoded["train"])
    rows = [0, 1, 2, 3, n, n + 1, n + 2]
    units = {"train": 4, "unlabelled": 3}
    results = []
    for apart in (False, True):
        if apart:
            assert enable_first_token_last_layer(model)
            batch = {"train": spec.collate(joined, rows[:4], tok.pad_token_id),
                     "unlabelled": spec.collate(joined, rows[4:], tok.pad_token_id)}
        else:
            batch = spec.collate(joined, rows, tok.pad_token_id)
        model.zero_grad(set_to_none=True)
        obj.extras().zero_grad(set_to_none=True)
        out = obj(model, batch, rows, units)
        out.total.backward()
        grads = {k: p.grad.clone() for k, p in [*model.named_parameters(), *obj.extras().named_parameters()]
                 if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert set(a.parts) == set(b.parts) and len(a.parts) == 2
    for k in a.parts:
        torch.testing.assert_close(a.parts[k], b.parts[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert ga.keys() == gb.keys()
    # relative to the whole gradient's norm: summed gradients (the [CLS] embedding) add in another order
    diff = torch.cat([(ga[k] - gb[k]).flatten() for k in ga]).norm()
    assert float(diff) <= 1e-4 * float(torch.cat([g.flatten() for g in ga.values()]).norm())


def test_dann_classifier_lr_scale_moves_only_the_domain_classifier_faster(tiny_overrides, target_file, tmp_path):
    """AdamW's first update is lr * g / (|g| + eps) plus decoupled decay lr * wd * p, both linear in lr: with
    objective.classifier_lr_scale 10 the domain classifier moves 10x as far from the same start, and the encoder
    (same gradients) exactly as far."""
    import sftlab

    def one_step(scale):
        run = sftlab.train(sftlab.load_config(None, tiny_overrides + [
            "objective.name=dann", f"data.unlabelled={target_file}", f"objective.classifier_lr_scale={scale}",
            "train.max_steps=1", "train.warmup_ratio=0", "objective.gamma=100", f"output_dir={tmp_path / str(scale)}"]))
        ckpt = sorted((run / "checkpoints").iterdir())[-1]
        return load_file(str(ckpt / "extras.safetensors")), _weights(run)

    (c0, _), (c1, m1), (c10, m10) = one_step(1e-9), one_step(1), one_step(10)
    assert all(torch.equal(m1[k], m10[k]) for k in m1)
    for k in c1:
        assert (c1[k] - c0[k]).abs().max() > 0
        torch.testing.assert_close(c10[k] - c0[k], 10 * (c1[k] - c0[k]), rtol=1e-3, atol=1e-7)

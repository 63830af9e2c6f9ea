"""GAN-BERT as equations: each phase moves only its own model, a fake logit at -inf makes d_sup the k-class
cross-entropy, the saved model is k-class with the discriminator's first k logits, a perfect discriminator has
d_unsup = 0, resume == uninterrupted with both streams."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import crash_after_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _objective(tiny_overrides, toy_data, *extra):
    import sftlab
    from sftlab.data.prepare import prepare
    from sftlab.models import load_model
    from sftlab.registry import training_objectives
    from sftlab.tasks import task_spec
    from transformers import AutoTokenizer

    cfg = sftlab.load_config(None, tiny_overrides + ["objective.name=gan_bert", "data.k_shot=4",
                                                     f"data.unlabelled={toy_data['train']}", *extra])
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    data = prepare(cfg, tok)
    model = load_model(cfg.model.name, "classification", data.labels.names, seed=0)
    obj = training_objectives.get("gan_bert")(cfg, data, task_spec("classification").loss, tok)
    from sftlab.data.batches import collate, join

    joined = join(data.encoded["train"], data.encoded["unlabelled"])
    rows = list(range(8)) + [8 + i for i in range(8)]
    batch = collate(joined, rows, tok.pad_token_id, False)
    return obj, model, batch, rows, {"train": 8, "unlabelled": 8}


def test_each_phase_moves_only_its_own_model(tiny_overrides, toy_data):
    obj, model, batch, rows, units = _objective(tiny_overrides, toy_data)
    model.train()
    parts = obj.parts(model, batch, rows, units)
    disc = [p for p in model.parameters()] + list(obj.fake_logit.parameters())
    gen = list(obj.generator.parameters())
    d_grads = torch.autograd.grad(parts["d_sup"] + parts["d_unsup"], disc + gen, allow_unused=True, retain_graph=True)
    assert all(g is None for g in d_grads[len(disc):])  # the generator is untouched by the discriminator's loss
    assert any(g is not None and g.abs().sum() > 0 for g in d_grads[:len(disc)])
    g_grads = torch.autograd.grad(parts["g_adv"] + parts["g_feat"], disc + gen, allow_unused=True)
    assert all(g is None for g in g_grads[:len(disc)])  # the encoder, head and fake logit are untouched by G's loss
    assert all(g is not None and g.abs().sum() > 0 for g in g_grads[len(disc):])


def test_fake_logit_at_minus_infinity_is_k_class_cross_entropy(tiny_overrides, toy_data):
    from sftlab.tasks import task_spec

    obj, model, batch, rows, units = _objective(tiny_overrides, toy_data)
    model.eval()
    with torch.no_grad():
        obj.fake_logit.weight.zero_()
        obj.fake_logit.bias.fill_(-1e30)
        d_sup = obj.parts(model, batch, rows, units)["d_sup"]
        plain, _ = task_spec("classification").loss(model, batch)
    torch.testing.assert_close(d_sup, plain)


def test_perfect_discriminator_has_zero_unsupervised_loss_and_g_adv_grows(tiny_overrides, toy_data):
    eps = 1e-8
    p_real = torch.zeros(5)  # P(fake | real) = 0
    p_gen = torch.ones(5)  # P(fake | generated) = 1
    assert float(-torch.log(1 - p_real + eps).sum() - torch.log(p_gen + eps).sum()) == pytest.approx(0, abs=1e-6)
    g = [float(-torch.log(1 - torch.tensor(p) + eps)) for p in (0.1, 0.5, 0.9, 0.99)]
    assert g == sorted(g) and g[0] > 0


def test_trains_saves_a_k_class_model_and_resume_equals_uninterrupted(tiny_overrides, toy_data, tmp_path,
                                                                      monkeypatch):
    import sftlab
    import sftlab.train.loop as loop

    # 8 labelled rows / batch 8 = 1 step an epoch over 4 epochs; the unlabelled stream (56 rows) is at another
    # position in its own epoch when the run is cut at step 2
    common = tiny_overrides + ["objective.name=gan_bert", "data.k_shot=4", f"data.unlabelled={toy_data['train']}",
                               "train.epochs=4", "train.eval_every=1"]
    full = sftlab.train(sftlab.load_config(None, common + [f"output_dir={tmp_path / 'full'}"]))
    cfg = sftlab.load_config(None, common + [f"output_dir={tmp_path / 'cut'}"])
    real = crash_after_checkpoint(monkeypatch, step=2)
    with pytest.raises(KeyboardInterrupt):
        sftlab.train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cut = sftlab.train(cfg, resume=tmp_path / "cut")
    a, b = (load_file(str(r / "best" / "model.safetensors")) for r in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert any(all(f"loss/{p}" in r for p in ("d_sup", "d_unsup", "g_adv", "g_feat")) for r in logged)
    saved = json.loads((full / "best" / "config.json").read_text())
    assert len(saved["id2label"]) == 2  # a plain k-class classifier: the fake class lives beside it
    assert not any("generator" in k or "fake" in k for k in a)


def test_bad_inputs(tiny_overrides, toy_data):
    import sftlab
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="set data.unlabelled"):
        sftlab.train(sftlab.load_config(None, tiny_overrides + ["objective.name=gan_bert"]))
    with pytest.raises(ConfigError, match="noise_size"):
        sftlab.load_config(None, tiny_overrides + ["objective.name=gan_bert", "objective.noise_size=0"])

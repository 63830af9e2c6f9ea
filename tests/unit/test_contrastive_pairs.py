"""SetFit-style contrastive pairs as equations: R partners per row, alternately same class and another class, a
pure function of (seed, step, row); the loss is the mean squared cosine error over each row's pairs; head: logistic
writes exactly the logistic regression's decision into the head; resume == uninterrupted."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import crash_after_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _setup(tiny_overrides, *extra):
    import sftlab
    from sftlab.data.prepare import prepare
    from sftlab.models import load_model
    from sftlab.registry import training_objectives
    from sftlab.tasks import task_spec
    from transformers import AutoTokenizer

    cfg = sftlab.load_config(None, tiny_overrides + ["objective.name=contrastive_pairs", "data.k_shot=6", *extra])
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    data = prepare(cfg, tok)
    model = load_model(cfg.model.name, "classification", data.labels.names, seed=0)
    return training_objectives.get("contrastive_pairs")(cfg, data, task_spec("classification").loss, tok), model


def test_partners_alternate_classes_and_are_seeded(tiny_overrides):
    obj, _ = _setup(tiny_overrides, "objective.pairs_per_row=6")
    for row in range(len(obj.labels)):
        ps, ys = obj.partners(row)
        assert len(ps) == 6 and list(ys) == [1, 1, 1, 0, 0, 0]
        assert all(obj.labels[p] == obj.labels[row] and p != row for p in ps[:3])
        assert all(obj.labels[p] != obj.labels[row] for p in ps[3:])
    a = obj.partners(3)[0]
    assert np.array_equal(a, obj.partners(3)[0])
    obj.on_step(1, 10)
    assert not np.array_equal(a, obj.partners(3)[0])  # another step, other partners


def test_loss_is_the_mean_squared_cosine_error_per_row(tiny_overrides):
    from sftlab.tasks import task_spec

    obj, model = _setup(tiny_overrides, "objective.pairs_per_row=4")
    model.eval()
    rows = [0, 5, 7]
    batch = task_spec("classification").collate(obj.data, rows, obj.pad_id)
    out = obj(model, batch, rows, {"train": 3})
    with torch.no_grad():
        feats, _, _ = obj._forward(model, list(range(len(obj.labels))), torch.device("cpu"))
    want = 0.0
    for r in rows:
        ps, ys = obj.partners(r)
        cos = torch.nn.functional.cosine_similarity(feats[r][None], feats[ps], dim=-1)
        want += float(((cos - torch.tensor(ys).float()) ** 2).mean())
    assert float(out.total.detach()) == pytest.approx(want, rel=1e-5)
    assert set(out.parts) == {"pairs"}


def test_logistic_head_is_the_regression_fit(tiny_overrides):
    from sklearn.linear_model import LogisticRegression

    obj, model = _setup(tiny_overrides)
    obj.before_eval(model)
    model.eval()
    with torch.no_grad():
        feats, _, logits = obj._forward(model, list(range(len(obj.labels))), torch.device("cpu"))
    fit = LogisticRegression(max_iter=1000).fit(feats.double().numpy(), obj.labels)
    margin = (logits[:, 1] - logits[:, 0]).numpy()
    np.testing.assert_allclose(margin, fit.decision_function(feats.double().numpy()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", ["logistic", "end_to_end"])
def test_resume_equals_uninterrupted(tiny_overrides, tmp_path, monkeypatch, head):
    import sftlab
    import sftlab.train.loop as loop

    common = tiny_overrides + ["objective.name=contrastive_pairs", f"objective.head={head}", "data.k_shot=8",
                               "objective.pairs_per_row=4", "train.epochs=3", "train.eval_every=1"]
    full = sftlab.train(sftlab.load_config(None, common + [f"output_dir={tmp_path / 'full'}"]))
    cfg = sftlab.load_config(None, common + [f"output_dir={tmp_path / 'cut'}"])
    real = crash_after_checkpoint(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        sftlab.train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cut = sftlab.train(cfg, resume=tmp_path / "cut")
    a, b = (load_file(str(r / "best" / "model.safetensors")) for r in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/pairs" in r and (head == "logistic" or "loss/head" in r) for r in logged)


def test_bad_inputs(tiny_overrides, toy_data):
    import sftlab
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="pairs_per_row must be >= 2"):
        sftlab.load_config(None, tiny_overrides + ["objective.name=contrastive_pairs", "objective.pairs_per_row=1"])
    with pytest.raises(ConfigError, match="task classification"):
        sftlab.train(sftlab.load_config(None, tiny_overrides + ["objective.name=contrastive_pairs", "task=regression",
                                                                "data.label=label"]))


def test_logistic_head_on_a_non_linear_head_is_refused_before_training(tiny_overrides, tmp_path):
    """RoBERTa/MPNet heads are dense + tanh + projection: head logistic cannot write them. Said at start, not after
    the whole run at its first evaluation (it once cost an hour of mpnet training)."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    import sftlab
    from sftlab.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("model.name")))
    folder = tmp_path / "tiny-roberta"
    RobertaModel(RobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=130)).save_pretrained(folder)
    tok.save_pretrained(folder)
    over = [o for o in tiny_overrides if not o.startswith("model.name")] + [f"model.name={folder}",
                                                                         "objective.name=contrastive_pairs"]
    with pytest.raises(ConfigError, match="head is RobertaClassificationHead; use objective.head=end_to_end"):
        sftlab.train(sftlab.load_config(None, over))
    assert not (tmp_path / "run").exists()

"""task embedding + objective simcse as equations: dropout off puts the positives at cosine 1 (loss = the
hand-computed InfoNCE), the STS evaluation is Spearman of cosines, a run trains, resumes exactly and starts a
classifier, and the bad inputs are one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import crash_after_checkpoint, make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def emb_overrides(tiny_model_dir, tmp_path):
    train = tmp_path / "text.txt"
    train.write_text("\n".join(r["text"] for r in make_rows(48)) + "\n", encoding="utf-8")
    rows = make_rows(24, seed=2)
    pairs = [{"s1": a["text"], "s2": b["text"], "score": float(a["label"] == b["label"]) * 4 + (i % 3) * 0.3}
             for i, (a, b) in enumerate(zip(rows, rows[1:] + rows[:1]))]
    dev = write_jsonl(tmp_path / "sts.jsonl", pairs)
    return [f"model.name={tiny_model_dir}", "task=embedding", "objective.name=simcse", f"data.train={train}",
            f"data.dev={dev}", "data.dev_columns={text: s1, text_pair: s2, label: score}", "train.epochs=2",
            "train.batch_size=8", "train.lr=1e-3", "train.precision=fp32", "train.progress=false",
            f"output_dir={tmp_path / 'run'}"]


def test_without_dropout_positives_sit_at_cosine_one_and_loss_is_infonce(tiny_model_dir):
    from sftlab.models import load_model
    from sftlab.objectives.simcse import SimCSE, contrastive
    from sftlab.tasks.embedding import embed

    model = load_model(str(tiny_model_dir), "embedding", None)  # the tiny BERT has dropout 0
    ids = torch.randint(5, 1000, (5, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    z = embed(model, batch)
    obj = SimCSE.__new__(SimCSE)
    obj.temperature = 0.05
    out = obj(model, batch, list(range(5)), {"train": 5})
    cos = torch.nn.functional.cosine_similarity(z[:, None], z[None], dim=-1)
    assert torch.allclose(torch.diagonal(cos), torch.ones(5), atol=1e-5)  # twins identical without dropout
    want = sum(-torch.log_softmax(cos[i] / 0.05, 0)[i] for i in range(5))
    torch.testing.assert_close(out.total, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(contrastive(z, z, 0.05), want, rtol=1e-4, atol=1e-4)


def test_sts_evaluation_is_spearman_of_cosines(tiny_model_dir, emb_overrides):
    import numpy as np

    import sftlab
    from sftlab.data.prepare import prepare
    from sftlab.eval.metrics import compute_metrics
    from sftlab.models import load_model, load_tokenizer
    from sftlab.tasks import task_spec
    from sftlab.tasks.embedding import embed_all

    cfg = sftlab.load_config(None, emb_overrides)
    tok = load_tokenizer(cfg.model.name)
    dev = prepare(cfg, tok).encoded["dev"]
    model = load_model(str(tiny_model_dir), "embedding", None)
    kw = dict(batch_size=4, pad_id=tok.pad_token_id, device=torch.device("cpu"), bf16=False)
    got = task_spec("embedding").evaluate(model, dev, **kw)
    za, zb = embed_all(model, dev.a, **kw), embed_all(model, dev.b, **kw)
    cos = (za * zb).sum(1) / (np.linalg.norm(za, axis=1) * np.linalg.norm(zb, axis=1))
    assert got["spearman"] == pytest.approx(compute_metrics("regression", cos, np.array(dev.scores))["spearman"])


def test_run_trains_resumes_exactly_and_starts_a_classifier(emb_overrides, tmp_path, monkeypatch, toy_data):
    import sftlab
    import sftlab.train.loop as loop

    full = sftlab.train(sftlab.load_config(None, emb_overrides + [f"output_dir={tmp_path / 'full'}",
                                                                  "train.eval_every=3"]))
    logged = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/contrastive" in r for r in logged) and any("spearman" in r for r in logged)
    cfg = sftlab.load_config(None, emb_overrides + [f"output_dir={tmp_path / 'cut'}", "train.eval_every=3"])
    real = crash_after_checkpoint(monkeypatch, step=6)
    with pytest.raises(KeyboardInterrupt):
        sftlab.train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cut = sftlab.train(cfg, resume=tmp_path / "cut")
    a, b = (load_file(str(r / "best" / "model.safetensors")) for r in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a) and any("pooler" in k for k in a)
    cls = sftlab.train(sftlab.load_config(None, [f"model.name={full / 'best'}", f"data.train={toy_data['train']}",
                                                 "train.epochs=1", "train.progress=false", "train.precision=fp32",
                                                 f"output_dir={tmp_path / 'cls'}"]))
    w = load_file(str(cls / "best" / "model.safetensors"))
    assert "classifier.weight" in w


def test_bad_inputs_one_line(emb_overrides, tmp_path):
    import sftlab
    from sftlab.errors import ConfigError

    with pytest.raises(Exception, match="objective.name=simcse"):
        sftlab.load_config(None, [o for o in emb_overrides if not o.startswith("objective")])
    with pytest.raises(Exception, match="temperature must be > 0"):
        sftlab.load_config(None, emb_overrides + ["objective.temperature=0"])
    with pytest.raises(Exception, match="dev_columns: unknown"):
        sftlab.load_config(None, emb_overrides + ["data.dev_columns={txt: s1}"])
    with pytest.raises(ConfigError, match="sentence pairs"):
        sftlab.train(sftlab.load_config(None, emb_overrides + ["data.dev_columns={text: s1}",
                                                               f"output_dir={tmp_path / 'x'}"]))


def test_cli_eval_scores_pairs_and_predict_refuses(emb_overrides, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", SFTLAB_ALLOCATOR="system")
    run = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *emb_overrides, f"output_dir={run}"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dev = next(o.split("=", 1)[1] for o in emb_overrides if o.startswith("data.dev="))
    proc = subprocess.run([sys.executable, "-m", "sftlab", "eval", str(run), "--data", dev, "--fp32"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["spearman"] == pytest.approx(summary["dev_metrics"]["spearman"], abs=1e-6)
    proc = subprocess.run([sys.executable, "-m", "sftlab", "predict", str(run), "--data", dev], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "starting point" in proc.stderr and "Traceback" not in proc.stderr

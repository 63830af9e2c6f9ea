"""Masked LM (tasks/masked_lm.py) as equations: masks pure in (seed, epoch, row), the 15% / 80-10-10 rates, specials
and padding never masked, loss only at chosen positions, split-invariant and resumable training, the built head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import crash_after_checkpoint, make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def mlm_overrides(tiny_model_dir, tmp_path) -> list[str]:
    rows = [{"text": r["text"]} for r in make_rows(48)]
    train = write_jsonl(tmp_path / "text.jsonl", rows)
    dev = tmp_path / "dev.txt"
    dev.write_text("\n".join(r["text"] for r in make_rows(16, seed=1)) + "\n\n", encoding="utf-8")
    return [f"model.name={tiny_model_dir}", "task=masked_lm", f"data.train={train}", f"data.dev={dev}",
            "train.epochs=2", "train.batch_size=8", "train.lr=1e-3", "train.precision=fp32", "train.progress=false",
            "data.mlm_probability=0.3", f"output_dir={tmp_path / 'run'}"]


def _encoded(n=400, length=64, whole_word=False, seed=0):
    from transformers import AutoTokenizer

    from sftlab.data.examples import Example
    from sftlab.data.text import _word_ids
    from sftlab.data.batches import encode
    from sftlab.models import resolve_model
    from sftlab.tasks.masked_lm import MaskedEncoded

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    rng = np.random.default_rng(0)
    words = "the film was unbelievably wonderful though somewhat overlong and its runtime dragged".split()
    ex = [Example(" ".join(rng.choice(words, int(rng.integers(3, length)))), None, None, i) for i in range(n)]
    enc = encode(tok, ex, 128)
    return MaskedEncoded(**vars(enc), seed=seed, probability=0.15, mask_id=tok.mask_token_id, vocab_size=len(tok),
                         specials=tuple(sorted(set(tok.all_special_ids))),
                         word_ids=_word_ids(tok, ex, 128) if whole_word else None), tok


def test_masks_are_pure_in_seed_epoch_row_and_differ_across_epochs():
    from sftlab.tasks.masked_lm import collate, draw

    data, tok = _encoded(50)
    a = collate(data, [3, 7, 1], tok.pad_token_id, epoch=2)
    b = collate(data, [1], tok.pad_token_id, epoch=2)  # another batch, another split: row 1 masked the same
    n = len(data.input_ids[1])
    assert torch.equal(a["input_ids"][2, :n], b["input_ids"][0, :n]) and torch.equal(a["labels"][2, :n], b["labels"][0, :n])
    assert any(not np.array_equal(draw(data, i, 0)[0], draw(data, i, 1)[0]) for i in range(50))  # dynamic masking


@pytest.mark.parametrize("whole_word", [False, True])
def test_rates_over_100k_tokens_and_specials_never_masked(whole_word):
    from sftlab.tasks.masked_lm import collate

    data, tok = _encoded(3000, whole_word=whole_word)
    batch = collate(data, list(range(len(data))), tok.pad_token_id)
    ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    orig = torch.full_like(ids, tok.pad_token_id)
    for r in range(len(data)):
        orig[r, :len(data.input_ids[r])] = torch.tensor(data.input_ids[r])
    special = torch.isin(orig, torch.tensor(data.specials))
    chosen = labels != -100
    candidates = int((~special & (att == 1)).sum())
    assert candidates > 100_000
    assert not (chosen & special).any() and not (chosen & (att == 0)).any()
    assert torch.equal(labels[chosen], orig[chosen])
    rate = int(chosen.sum()) / candidates
    assert abs(rate - 0.15) < 0.01 * (1 if not whole_word else 2)  # words of several pieces make it lumpier
    masked = (ids[chosen] == tok.mask_token_id).float().mean()
    kept = (ids[chosen] == orig[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01  # (a random swap keeps the token 1 in 30k)
    assert not (ids[~chosen] != orig[~chosen]).any()  # nothing else changes
    if whole_word:  # a chosen piece means every piece of its word is chosen
        for r in range(200):
            w = np.asarray(data.word_ids[r])
            picked = set(w[chosen[r, :len(w)].numpy()])
            assert all(chosen[r, j] for j in range(len(w)) if w[j] in picked)


def test_loss_only_at_chosen_positions_and_units_equal_chosen_tokens(tiny_model_dir):
    from sftlab.models import load_model
    from sftlab.tasks.masked_lm import collate, masked_lm_loss, step_units

    data, tok = _encoded(12)
    model = load_model(str(tiny_model_dir), "masked_lm", None)
    batch = collate(data, list(range(12)), tok.pad_token_id, epoch=1)
    loss, logits = masked_lm_loss(model, batch)
    keep = batch["labels"] != -100
    full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ref = torch.nn.functional.cross_entropy(full[keep], batch["labels"][keep], reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-5) and logits.shape[0] == int(keep.sum())
    assert step_units(data, list(range(12)), 1) == int(keep.sum())


def test_new_head_starts_from_the_unigram_model_and_pooler_kept(tiny_model_dir):
    from safetensors import safe_open

    from sftlab.models import load_model

    data, tok = _encoded(40)
    model = load_model(str(tiny_model_dir), "masked_lm", None, train_data=data)
    head = model.cls.predictions
    dense = head.transform.dense
    assert torch.equal(dense.weight, torch.eye(dense.weight.shape[0])) and not dense.bias.any()
    assert torch.equal(head.transform.LayerNorm.weight, torch.ones(32)) and not head.transform.LayerNorm.bias.any()
    assert head.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    counts = torch.bincount(torch.tensor([t for row in data.input_ids for t in row]), minlength=len(tok))
    prior = torch.log((counts + 1) / (counts.sum() + len(tok))).float()
    torch.testing.assert_close(head.bias.data, prior)
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert torch.equal(model.bert.pooler.dense.weight, f.get_tensor("pooler.dense.weight"))


def test_train_split_invariant_and_best_starts_a_classifier(mlm_overrides, tmp_path, toy_data):
    import sftlab
    from safetensors.torch import load_file

    runs = []
    for name, extra in (("a", ["train.batch_size=8", "train.grad_accum=1"]),
                        ("b", ["train.batch_size=2", "train.grad_accum=4"])):
        cfg = sftlab.load_config(None, mlm_overrides + extra + [f"output_dir={tmp_path / name}"])
        runs.append(sftlab.train(cfg))
    wa, wb = (load_file(str(r / "best" / "model.safetensors")) for r in runs)
    assert wa.keys() == wb.keys() and "bert.pooler.dense.weight" in wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=5e-5)  # fp reassociation only
    import json

    lines = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    dev = [x for x in lines if x.get("split") == "dev"]
    assert dev and all("perplexity" in x for x in dev) and dev[-1]["perplexity"] < dev[0]["perplexity"] * 1.5
    # The result starts a classifier, with the original (untrained) pooler
    cls = sftlab.load_config(None, [f"model.name={runs[0] / 'best'}", f"data.train={toy_data['train']}",
                                    "train.epochs=1", "train.progress=false", "train.precision=fp32",
                                    f"output_dir={tmp_path / 'cls'}"])
    w = load_file(str(sftlab.train(cls) / "best" / "model.safetensors"))
    assert "bert.pooler.dense.weight" in w and "classifier.weight" in w


def test_resume_after_crash_equals_uninterrupted(mlm_overrides, tmp_path, monkeypatch):
    import sftlab
    from safetensors.torch import load_file

    full = sftlab.train(sftlab.load_config(None, mlm_overrides + [f"output_dir={tmp_path / 'full'}",
                                                                   "train.eval_every=3"]))
    cfg = sftlab.load_config(None, mlm_overrides + [f"output_dir={tmp_path / 'cut'}", "train.eval_every=3"])
    import sftlab.train.loop as loop

    real = crash_after_checkpoint(monkeypatch, step=6)
    with pytest.raises(KeyboardInterrupt):
        sftlab.train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cut = sftlab.train(cfg, resume=tmp_path / "cut")
    a, b = load_file(str(full / "best" / "model.safetensors")), load_file(str(cut / "best" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_one_line(mlm_overrides, tmp_path, tiny_llama_dir):
    import sftlab
    from sftlab.errors import ConfigError, DataError

    with pytest.raises(Exception, match="mlm_probability"):
        sftlab.load_config(None, mlm_overrides + ["data.mlm_probability=0"])
    with pytest.raises(Exception, match="masked_lm trains with objective sft"):
        sftlab.load_config(None, mlm_overrides + ["objective.name=distill", f"objective.teacher={tmp_path}"])
    with pytest.raises(Exception, match="saves an adapter"):
        sftlab.load_config(None, mlm_overrides + ["strategy.name=lora"])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        sftlab.train(sftlab.load_config(None, mlm_overrides + [f"data.dev={blank}", f"output_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="no mask token"):
        sftlab.train(sftlab.load_config(None, mlm_overrides + [f"model.name={tiny_llama_dir}",
                                                               f"output_dir={tmp_path / 'y'}"]))


def test_two_processes_equal_one(mlm_overrides, tmp_path):
    import os
    import subprocess
    import sys

    from tests.unit.test_ddp import LAUNCHERS, ckpt, free_port

    common = [o for o in mlm_overrides if not o.startswith(("output_dir", "train.batch_size"))] + ["train.epochs=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    runs = {}
    for name, launch, batch in (("two", LAUNCHERS["torchrun"](free_port()), 4), ("one", ["-m", "sftlab"], 8)):
        runs[name] = tmp_path / name
        proc = subprocess.run([sys.executable, *launch, "train", "-", *common, f"train.batch_size={batch}",
                               f"output_dir={runs[name]}"], env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    wa, wb = ckpt(runs["two"]), ckpt(runs["one"])
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_cli_eval_gives_the_runs_dev_perplexity_and_other_verbs_refuse(mlm_overrides, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", SFTLAB_ALLOCATOR="system")
    run = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "sftlab", "train", "-", *mlm_overrides, f"output_dir={run}"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dev = next(o.split("=", 1)[1] for o in mlm_overrides if o.startswith("data.dev="))
    proc = subprocess.run([sys.executable, "-m", "sftlab", "eval", str(run), "--data", dev, "--fp32"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    assert abs(scores["perplexity"] - summary["dev_metrics"]["perplexity"]) < 1e-3 * scores["perplexity"]
    for verb in (["predict", str(run), "--data", dev], ["export", str(run), "--format", "merged",
                                                         "--out", str(tmp_path / "e")]):
        proc = subprocess.run([sys.executable, "-m", "sftlab", *verb], env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "starting point" in proc.stderr and "Traceback" not in proc.stderr

"""`model.keep_layers` (issue 16): keeping every block changes nothing; kept blocks carry the original tensors; the
result saves and reloads as the smaller model; a half-depth decoder still generates; bad selections are one line."""
from __future__ import annotations

import json

import pytest
import torch

from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def batch(tok, texts=("the film was great", "a dull, tiresome plot")):
    return tok(list(texts), padding=True, return_tensors="pt")


@pytest.mark.parametrize("kind", ["enc", "dec"])
def test_keeping_every_block_gives_the_original_logits(kind, tiny_model_dir, tiny_llama_dir):
    path, task = (tiny_model_dir, "classification") if kind == "enc" else (tiny_llama_dir, "causal_lm")
    labels = ["negative", "positive"] if kind == "enc" else None
    tok = load_tokenizer(str(path))
    full = load_model(str(path), task, labels, seed=3).eval()
    same = load_model(str(path), task, labels, seed=3, keep_layers=[0, 1]).eval()
    with torch.no_grad():
        assert torch.equal(full(**batch(tok)).logits, same(**batch(tok)).logits)


@pytest.mark.parametrize("kind", ["enc", "dec"])
def test_kept_blocks_carry_the_original_tensors(kind, tiny_model_dir, tiny_llama_dir, tmp_path):
    from sftlab.strategies.anatomy import find_stack

    path, task = (tiny_model_dir, "classification") if kind == "enc" else (tiny_llama_dir, "causal_lm")
    labels = ["negative", "positive"] if kind == "enc" else None
    full = load_model(str(path), task, labels, seed=3)
    half = load_model(str(path), task, labels, seed=3, keep_layers=[1])
    (_, a), (_, b) = find_stack(full), find_stack(half)
    assert len(b) == 1 and half.config.num_hidden_layers == 1
    for (na, ta), (nb, tb) in zip(a[1].state_dict().items(), b[0].state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    # outside the stack (embeddings, norms, head) everything is the original's
    rest = {k: v for k, v in full.state_dict().items() if ".layers." not in k and ".layer." not in k}
    assert all(torch.equal(v, half.state_dict()[k]) for k, v in rest.items())
    half.save_pretrained(tmp_path / "s")  # saves and reloads as the smaller model
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1


def test_half_depth_decoder_still_generates(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    model = load_model(str(tiny_llama_dir), "causal_lm", None, keep_layers=[1]).eval()
    x = tok(["hello there"], return_tensors="pt")
    out = model.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > x["input_ids"].shape[1]
    assert all(m.layer_idx == 0 for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int))


@pytest.mark.parametrize("keep,words", [([2], "out of range; "), ([1, 0], "increasing"), ([0, 0], "increasing"),
                                        ([], "empty")])
def test_bad_selections_are_one_line(keep, words, tiny_model_dir):
    from sftlab.models.load import check_model

    with pytest.raises(ConfigError, match=words):
        check_model(str(tiny_model_dir), keep_layers=keep)


def test_a_run_with_kept_layers_trains_saves_and_evaluates(tiny_overrides, tmp_path):
    from sftlab.eval.evaluate import evaluate_file, load_trained
    from sftlab.train.loop import train

    run = train(load_config(None, tiny_overrides + ["model.keep_layers=[1]", "train.epochs=1"]))
    model, _, meta = load_trained(run)
    assert model.config.num_hidden_layers == 1 and meta["keep_layers"] == [1]
    dev = [o.split("=", 1)[1] for o in tiny_overrides if o.startswith("data.dev=")][0]
    assert "accuracy" in evaluate_file(str(run), dev, bf16=False, analysis=False)


def test_lora_on_kept_layers_reloads_on_the_cut_base(tiny_overrides, tmp_path):
    from sftlab.eval.evaluate import load_trained
    from sftlab.train.loop import train

    run = train(load_config(None, tiny_overrides + ["model.keep_layers=[0]", "strategy.name=lora", "strategy.r=4",
                                                    "train.epochs=1"]))
    model, _, meta = load_trained(run)
    assert meta["keep_layers"] == [0] and model.base_model.model.config.num_hidden_layers == 1

"""Causal-LM continued pre-training on raw text (`data.format: text`): every token is a target, long texts are cut
into max_length pieces without losing a token, documents end with <|endoftext|>, packing keeps pieces apart."""
from __future__ import annotations

import json

import pytest

from tests.conftest import CHAT_WORDS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def text_files(tmp_path):
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choices(CHAT_WORDS, k=rng.randint(3, 60))) for _ in range(40)]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(texts) + "\n", encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:8]), encoding="utf-8")
    return texts, train, dev


def test_pieces_keep_every_token_and_every_token_is_a_target(tiny_llama_dir, text_files):
    from transformers import AutoTokenizer

    from sftlab.data.examples import Example, Split
    from sftlab.data.text import encode_lm_text

    texts, _, _ = text_files
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = encode_lm_text(tok, Split("x", [Example(t, None, None, i) for i, t in enumerate(texts)]), 16)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    docs = [tok(x, add_special_tokens=False)["input_ids"] + [sep] for x in texts]
    targets = [t for labels in enc.labels for t in labels if t != -100]
    assert targets == [t for d in docs for t in d[1:]]  # each token after a text's first is a target exactly once
    assert max(enc.lengths) == 16 and enc.examples == len(texts)
    for ids, labels in zip(enc.input_ids, enc.labels):
        assert labels == ids[1:] + [-100]


def test_raw_text_run_trains_packs_and_reports_perplexity(tiny_llama_dir, text_files, tmp_path):
    import sftlab

    _, train, dev = text_files
    cfg = sftlab.load_config(None, [f"model.name={tiny_llama_dir}", "task=causal_lm", f"data.train={train}",
                                    f"data.dev={dev}", "data.format=text", "data.packing=true", "data.max_length=32",
                                    "train.epochs=2", "train.batch_size=4", "train.lr=3e-3", "train.precision=fp32",
                                    "train.progress=false", f"output_dir={tmp_path / 'run'}"])
    run = sftlab.train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train"]["packs"] < summary["data"]["train"]["examples"]
    dev_rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"dev"' in x]
    assert dev_rows[-1]["perplexity"] < dev_rows[0]["perplexity"]


def test_format_text_is_for_causal_lm_only(tiny_model_dir, text_files):
    import sftlab

    _, train, _ = text_files
    with pytest.raises(Exception, match="format: text"):
        sftlab.load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", "data.format=text"])

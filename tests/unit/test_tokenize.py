"""data.batches.tokenize calls a fast tokenizer's Rust backend directly (issue 22): the same ids and token types
as the transformers call it replaces, for a WordPiece pair tokenizer and a byte-level BPE one."""
from transformers import AutoTokenizer

from sftlab.data.batches import tokenize

from tests.conftest import train_bpe_tokenizer

TEXTS = ["a fine film .", "", "Ünïcödé  and  spaces\\tand tabs", "the " * 300, "it's [SEP] inside", "x"]
PAIRS = ["second", "b", "", "c d e", "[CLS]", "the end"]


def same(tok, texts, pairs):
    ids, types = tokenize(tok, texts, pairs)
    ref = tok(texts, pairs, truncation=False, verbose=False)
    assert ids == ref["input_ids"]
    assert types == ref.get("token_type_ids")


def test_wordpiece_single_and_pairs(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    same(tok, TEXTS, None)
    same(tok, TEXTS, PAIRS)


def test_byte_level_bpe_without_token_types():
    tok = train_bpe_tokenizer()
    same(tok, TEXTS, None)
    same(tok, TEXTS, PAIRS)


def test_truncation_left_on_by_an_earlier_call_is_ignored(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok(TEXTS, truncation=True, max_length=4)  # leaves truncation set on the backend
    same(tok, TEXTS, None)

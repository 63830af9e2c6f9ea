"""Generation (left padding, order, stops, seeding), generation metrics, and few-shot selection on a tiny Llama."""
from __future__ import annotations

import math
import string

import pytest
import torch

from sftlab.errors import ConfigError, DataError
from sftlab.eval import generate as gen_mod
from sftlab.eval.gen_metrics import (bleu, exact_match, generation_metrics, label_accuracy, parse_label, perplexity,
                                     rouge_l, worst_examples)
from sftlab.eval.generate import cut_at_stop, generate
from sftlab.eval.icl import build_icl_messages, select_shots

SPECIALS = ["<pad>", "<s>", "</s>"]
PROMPTS = ["the film was great", "a", "an excellent meal, truly", "ok",
           "what a dreadful, boring, ugly little show it was", "book: 5/5", "xyz"]


def make_tokenizer(pad: bool = True):
    """Character-level fast tokenizer over printable ASCII: one token per character, so lengths are countable."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + chars)}, merges=[]))
    backend.decoder = decoders.Fuse()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", **extra)


def make_model(vocab_size: int, *, special_bias: float = -1e4, seed: int = 0, init: float = 0.2):
    """A 2-layer, 32-wide random Llama. `special_bias` on the pad/bos/eos logits: -1e4 never emits them (outputs run
    to max_new_tokens), +1e4 on EOS emits it at once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=init)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    head = torch.nn.Linear(32, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        if special_bias < 0:
            head.bias[:3] = special_bias
        else:
            head.bias[2] = special_bias
    model.lm_head = head
    return model


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(len(tok))


# ---------------------------------------------------------------- generation


def test_batched_greedy_equals_one_at_a_time(model, tok):
    single = [generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    for bs in (2, 3, 16):
        assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=bs) == single
    assert len(set(single)) > 1 and all(single)  # sanity: the prompts steer the tiny model


def test_output_order_is_input_order(model, tok):
    forward = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    backward = generate(model, tok, PROMPTS[::-1], max_new_tokens=8, batch_size=2)
    assert backward == forward[::-1]
    assert generate(model, tok, [PROMPTS[4], PROMPTS[1]], max_new_tokens=8) == [forward[4], forward[1]]


@pytest.mark.parametrize("n", [1, 5, 17])
def test_max_new_tokens_respected(model, tok, n):
    # One character per token and no special tokens possible: the output is exactly n characters.
    assert [len(o) for o in generate(model, tok, PROMPTS, max_new_tokens=n, batch_size=4)] == [n] * len(PROMPTS)


def test_eos_and_what_follows_are_stripped(tok):
    eos_model = make_model(len(tok), special_bias=1e4)
    assert generate(eos_model, tok, PROMPTS, max_new_tokens=6, batch_size=3) == [""] * len(PROMPTS)
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    assert gen_mod._finish(tok, ids + [tok.eos_token_id] + ids, {tok.eos_token_id, tok.pad_token_id}, []) == "abc"
    assert gen_mod._finish(tok, ids + [tok.pad_token_id] * 3, {tok.eos_token_id, tok.pad_token_id}, []) == "abc"


def test_stop_string_stops_generation_and_cuts_text(model, tok, monkeypatch):
    prompt = PROMPTS[0]
    full = generate(model, tok, [prompt], max_new_tokens=20)[0]
    stop = full[3:5]
    expected = full[:full.index(stop)]
    assert len(expected) < len(full)

    lengths = []
    real = type(model).generate

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(type(model), "generate", spy)
    assert generate(model, tok, [prompt], max_new_tokens=20, stop=[stop, "never-emitted"]) == [expected]
    assert lengths[-1] < 20  # transformers' stop_strings criterion ended generation early, not only the cut
    # Without the criterion (tokenizers it cannot index) the decoded text is still cut.
    monkeypatch.setattr(gen_mod, "_stop_strings_supported", lambda *a: False)
    assert generate(model, tok, [prompt], max_new_tokens=20, stop=[stop]) == [expected]
    assert lengths[-1] == 20
    # Batched: rows that stop early are padded by generate; the cut still holds per row.
    batched = generate(model, tok, PROMPTS, max_new_tokens=20, stop=[stop], batch_size=4)
    plain = generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=4)
    assert batched == [cut_at_stop(p, [stop]) for p in plain]


def test_cut_at_stop_earliest_of_several():
    assert cut_at_stop("abc\nUser: x###", ["###", "\nUser:"]) == "abc"
    assert cut_at_stop("abc", ["zz", ""]) == "abc"
    assert cut_at_stop("abc", None) == "abc"


def test_seeded_sampling_is_reproducible_and_seed_dependent(tok):
    model = make_model(len(tok), init=0.05)  # flatter distribution: samples vary
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, batch_size=3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate(model, tok, PROMPTS, seed=1, **kw)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert generate(model, tok, PROMPTS, seed=1, **kw) == a
    assert generate(model, tok, PROMPTS, seed=2, **kw) != a
    assert generate(model, tok, PROMPTS, max_new_tokens=16) != a  # greedy differs from sampling
    assert generate(model, tok, PROMPTS, seed=1, top_p=0.01, **kw) == generate(model, tok, PROMPTS, max_new_tokens=16)


def test_checkpoint_generation_defaults_do_not_leak(model, tok):
    greedy = generate(model, tok, PROMPTS, max_new_tokens=10)
    original = model.generation_config
    model.generation_config = type(original)(**original.to_dict())
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.top_k = 1
    tweaked = model.generation_config
    try:
        assert generate(model, tok, PROMPTS, max_new_tokens=10) == greedy
        assert model.generation_config is tweaked  # restored after the call
    finally:
        model.generation_config = original


def test_tokenizer_state_untouched_and_pad_falls_back_to_eos(model, tok):
    with_pad = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    no_pad = make_tokenizer(pad=False)
    assert no_pad.pad_token is None
    assert generate(model, no_pad, PROMPTS, max_new_tokens=6, batch_size=4) == with_pad
    assert no_pad.pad_token is None and no_pad.padding_side == "right" and tok.padding_side == "right"
    assert not model.training


def test_bf16_and_progress_bar(model, tok, capsys):
    out = generate(model, tok, PROMPTS, max_new_tokens=4, bf16=True, progress=True)
    assert [len(o) for o in out] == [4] * len(PROMPTS)
    assert "generate" in capsys.readouterr().err


def test_edge_cases(model, tok):
    assert generate(model, tok, []) == []
    with pytest.raises(DataError, match="prompt 1 is empty"):
        generate(model, tok, ["a", ""])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, tok, ["a"], max_new_tokens=0)


# ---------------------------------------------------------------- metrics


def test_exact_match_normalization():
    preds = ["  The  Cat.", "PARIS!", "new york", "dog", "a b"]
    refs = ["the cat", "Paris", "New\tYork ...", "cat", "ab"]
    assert exact_match(preds, refs) == pytest.approx(3 / 5)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_label_parsing_earliest_whole_word():
    labels = ["positive", "negative", "neutral"]
    assert parse_label("Negative, though parts are positive.", labels) == "negative"
    assert parse_label("The sentiment is POSITIVE", labels) == "positive"
    assert parse_label("nonpositive stuff", labels) is None  # whole words only
    assert parse_label("positively negative", labels) == "negative"
    assert parse_label("not good at all", ["good", "not good"]) == "not good"  # same start: longer label
    acc, parsed = label_accuracy(["positive", "I think negative", "no idea", "Neutral."],
                                 ["positive", "positive", "neutral", "neutral"], labels)
    assert parsed == ["positive", "negative", None, "neutral"]
    assert acc == pytest.approx(2 / 4)


def test_bleu_rouge_perplexity():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["zz yy xx ww vv", "qq rr ss tt uu"], refs) == pytest.approx(0.0, abs=1e-6)
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    assert rouge_l(["zz yy", "qq rr"], refs) == 0.0
    # LCS("the cat sat", "the cat sat on the mat today") = 3: P=1, R=3/7, F=2PR/(P+R)=0.6
    assert rouge_l(["the cat sat"], refs[:1]) == pytest.approx(0.6)
    assert perplexity(0.0) == 1.0 and perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf


def test_generation_metrics_and_worst_examples():
    preds, refs = ["positive", "the answer is negative", "zz"], ["positive", "negative", "neutral"]
    m = generation_metrics(preds, refs)
    assert set(m) == {"exact_match", "bleu", "rouge_l"}
    m = generation_metrics(preds, refs, labels=["positive", "negative", "neutral"])
    assert m["label_accuracy"] == pytest.approx(2 / 3) and m["exact_match"] == pytest.approx(1 / 3)
    worst = worst_examples(preds, refs, 2)
    assert [w["index"] for w in worst] == [2, 1] and worst[0]["rouge_l"] == 0.0 and worst[0]["pred"] == "zz"


# ---------------------------------------------------------------- in-context learning


def _pool():
    return [{"id": f"ex{i}", "text": f"t{i}", "label": lab}
            for i, lab in enumerate(["b"] * 5 + ["a"] * 4 + ["c"] * 6)]


def test_select_shots_balanced_round_robin_and_seeded():
    pool = _pool()
    shots = select_shots(pool, 7, seed=0)
    assert [s["label"] for s in shots] == ["a", "b", "c", "a", "b", "c", "a"]  # earlier labels get the extra one
    assert len({s["id"] for s in shots}) == 7
    assert select_shots(pool, 7, seed=0) == shots
    assert [s["label"] for s in select_shots(pool, 7, seed=1)] == [s["label"] for s in shots]
    assert any(select_shots(pool, 7, seed=s) != shots for s in range(1, 6))
    # An exhausted label is skipped: 4 "a" examples, k=14 -> 4 a, 5 b, 5 c.
    labels = [s["label"] for s in select_shots(pool, 14, seed=3)]
    assert (labels.count("a"), labels.count("b"), labels.count("c")) == (4, 5, 5)


def test_select_shots_never_returns_the_query():
    pool = _pool()
    for seed in range(20):
        for q in range(len(pool)):
            assert pool[q] not in select_shots(pool, 6, seed, exclude={q})
        assert pool[3] not in select_shots(pool, 6, seed, exclude={"ex3"})
        assert pool[7] not in select_shots(pool, 14, seed, query=dict(pool[7]))
    with pytest.raises(ConfigError, match="15 shots"):
        select_shots(pool, 15, 0, exclude={0})


def test_select_shots_without_labels_is_seeded_sample():
    pool = [{"text": f"t{i}"} for i in range(10)]
    a = select_shots(pool, 4, seed=5)
    assert a == select_shots(pool, 4, seed=5) and len({s["text"] for s in a}) == 4
    assert any(select_shots(pool, 4, seed=s) != a for s in range(6, 10))
    assert select_shots(_pool(), 3, seed=0, label_key=None) == select_shots(_pool(), 3, seed=0, label_key="missing")
    assert select_shots(pool, 0, seed=0) == []


def test_build_icl_messages_renders_with_chat_template(tok):
    msgs = build_icl_messages([("2+2?", "4"), ("3+3?", "6")], "5+5?", system="Answer with a number.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1] == {"role": "user", "content": "5+5?"} and msgs[2]["content"] == "4"
    assert build_icl_messages([], "q") == [{"role": "user", "content": "q"}]
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<user>5+5?<assistant>") and text.index("<user>2+2?") < text.index("<assistant>4")

"""The k-shot protocol (issue 19) as equations: exactly K per class, seeded, nested, a disjoint true-few-shot dev
set, and the rest of the training file as the unlabelled stream."""
from __future__ import annotations

from collections import Counter

import pytest

from sftlab.config import load_config
from sftlab.data.prepare import prepare
from sftlab.errors import ConfigError, DataError
from tests.conftest import make_rows, write_jsonl


@pytest.fixture
def skewed(tmp_path):
    """32 positive, 16 negative, 8 neutral rows, interleaved."""
    rows = make_rows(64)
    neg = [r for r in rows if r["label"] == "negative"][:16]
    neutral = [{"text": f"the film was fine {i}", "label": "neutral"} for i in range(8)]
    pos = [r for r in rows if r["label"] == "positive"]
    mixed = [r for i in range(32) for r in (pos[i], *(neg[i:i + 1] if i < 16 else []),
                                            *(neutral[i // 4:i // 4 + 1] if i % 4 == 0 else []))]
    return str(write_jsonl(tmp_path / "train.jsonl", mixed))


def _prep(tiny_model_dir, train, *extra):
    from transformers import AutoTokenizer

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", *extra])
    return prepare(cfg, AutoTokenizer.from_pretrained(str(tiny_model_dir)))


def _lines(p, split="train"):
    return [e.line for e in p.splits[split].examples]


def test_exactly_k_per_class_seeded_and_nested(tiny_model_dir, skewed):
    names = None
    samples = {}
    for k in (2, 4, 6):
        for seed in (0, 1):
            p = _prep(tiny_model_dir, skewed, f"data.k_shot={k}", f"data.k_shot_seed={seed}")
            names = p.labels.names
            assert Counter(e.label for e in p.splits["train"].examples) == {c: k for c in range(len(names))}
            assert _lines(p) == sorted(_lines(p))  # file order kept
            samples[k, seed] = set(_lines(p))
    assert samples[2, 0] < samples[4, 0] < samples[6, 0] and samples[2, 1] < samples[4, 1]  # nested
    assert samples[4, 0] != samples[4, 1]  # another seed, another sample
    again = _prep(tiny_model_dir, skewed, "data.k_shot=4", "data.k_shot_seed=0")
    assert set(_lines(again)) == samples[4, 0]  # same seed, same rows
    # independent of train.seed: the sample is the data's, not the optimiser's
    assert set(_lines(_prep(tiny_model_dir, skewed, "data.k_shot=4", "train.seed=7"))) == samples[4, 0]


def test_true_few_shot_dev_is_disjoint_and_the_same_for_every_k(tiny_model_dir, skewed):
    devs = []
    for k in (2, 3):
        p = _prep(tiny_model_dir, skewed, f"data.k_shot={k}", "data.k_shot_dev=3")
        assert Counter(e.label for e in p.splits["dev"].examples) == {0: 3, 1: 3, 2: 3}
        assert not set(_lines(p)) & set(_lines(p, "dev"))
        devs.append(_lines(p, "dev"))
    assert devs[0] == devs[1]


def test_too_few_rows_names_the_class(tiny_model_dir, skewed):
    with pytest.raises(DataError, match=r"class 'neutral' has 8; lower data.k_shot \(at most 8\)"):
        _prep(tiny_model_dir, skewed, "data.k_shot=9")
    with pytest.raises(DataError, match=r"k_shot_dev=3 needs 9 rows per class.*'neutral' has 8.*at most 5"):
        _prep(tiny_model_dir, skewed, "data.k_shot=6", "data.k_shot_dev=3")


def test_config_rules(tiny_model_dir, skewed, toy_data):
    base = [f"model.name={tiny_model_dir}", f"data.train={skewed}"]
    for bad, msg in [(["data.k_shot=0"], "data.k_shot must be >= 1"),
                     (["data.k_shot=4", "task=regression"], "for task classification"),
                     (["data.k_shot_dev=4"], "set data.k_shot"),
                     (["data.k_shot=4", "data.k_shot_dev=4", f"data.dev={toy_data['dev']}"], "unset data.dev")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, base + bad)


def test_the_training_file_as_unlabelled_text_is_its_unlabelled_rest(tiny_model_dir, skewed):
    p = _prep(tiny_model_dir, skewed, "data.k_shot=2", "data.k_shot_dev=2", f"data.unlabelled={skewed}",
              "objective.name=distill", f"objective.teacher={tiny_model_dir}")
    rest = set(_lines(p, "unlabelled"))
    assert len(rest) == 56 - 6 - 6 and not rest & (set(_lines(p)) | set(_lines(p, "dev")))
    assert "minus its 12 labelled rows" in p.splits["unlabelled"].source

"""EDA (data.augment) as equations: rates 0 is the identity, labels kept, edits a pure function of
(seed, row, copy), a missing WordNet is one line."""
from __future__ import annotations

import pytest

from sftlab.config import load_config
from sftlab.data.eda import augment, synonyms
from sftlab.data.examples import Example
from sftlab.errors import ConfigError

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/wordnet/data.noun").is_file()
                                and not __import__("os").environ.get("CI"),
                                reason="wordnet-base not installed (scripts/setup.sh installs it)")

ROWS = [Example("the movie was a great and moving experience , truly wonderful acting", None, 1, 2),
        Example("a dull , lifeless script and terrible jokes", "pair text stays", 0, 3),
        Example("fine", None, 1, 7)]


def cfg(**kw):
    return load_config(None, ["data.train=x.jsonl"] + [f"data.augment.{k}={v}" for k, v in kw.items()]).data.augment


def test_all_rates_zero_is_the_identity_and_labels_are_kept():
    out = augment(ROWS, cfg(copies=5, alpha=0))
    assert len(out) == 3 * 6 and out[:3] == ROWS
    for i, e in enumerate(out[3:]):
        src = ROWS[i // 5]
        assert (e.text, e.text_pair, e.label, e.line) == (src.text, src.text_pair, src.label, src.line)


def test_edits_are_seeded_per_row_and_copy_and_label_preserving():
    a, b = augment(ROWS, cfg(copies=8)), augment(ROWS, cfg(copies=8))
    assert [e.text for e in a] == [e.text for e in b]
    assert any(e.text != ROWS[0].text for e in a[3:11])  # something changed
    assert [e.label for e in a[3:]] == [r.label for r in ROWS for _ in range(8)]
    assert all(e.text_pair == "pair text stays" for e in a[11:19])  # only the first text is edited
    # a row's copies do not depend on the other rows (pure function of seed, line, copy)
    alone = augment([ROWS[1]], cfg(copies=8))
    assert [e.text for e in alone[1:]] == [e.text for e in a[11:19]]
    other = augment(ROWS, cfg(copies=8, seed=1))
    assert [e.text for e in other] != [e.text for e in a]


def test_each_operation_alone():
    text = ROWS[0].text
    words = text.split()
    swap = augment(ROWS[:1], cfg(copies=4, alpha=0, alpha_rs=0.2))[1:]
    changed = [e.text for e in swap if e.text != text]
    assert len(changed) == 1 and sorted(changed[0].split()) == sorted(words)  # one copy in four swaps
    deletion = [e.text for e in augment(ROWS[:1], cfg(copies=4, alpha=0, p_rd=0.5))[1:] if e.text != text]
    assert len(deletion) == 1 and set(deletion[0].split()) <= set(words) and len(deletion[0].split()) < len(words)
    sr = [e.text for e in augment(ROWS[:1], cfg(copies=4, alpha=0, alpha_sr=0.1))[1:] if e.text != text][0]
    changed_words = [(w, v) for w, v in zip(words, sr.split()) if w != v]
    assert len(sr.split()) == len(words) and changed_words and all(v in synonyms(w) for w, v in changed_words)
    assert augment([ROWS[2]], cfg(copies=4, alpha=0, p_rd=0.9))[1].text == "fine"  # one word is never deleted


def test_config_errors():
    for bad, msg in [(["data.augment.name=back_translation"], "unknown augmenter 'back_translation'; available: eda"),
                     (["data.augment.alpha=1.5"], "alpha must be in"), (["data.augment.copies=0"], "copies"),
                     (["data.augment.copies=2", "task=masked_lm"], "classification or regression")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, ["data.train=x.jsonl"] + bad)


def test_a_missing_wordnet_is_one_line(monkeypatch, tmp_path):
    import sftlab.data.eda as eda

    monkeypatch.setenv("SFTLAB_WORDNET", str(tmp_path))
    eda._wordnet.cache_clear()
    try:
        with pytest.raises(ConfigError, match="apt-get install wordnet-base"):
            augment(ROWS, cfg(copies=1))
    finally:
        eda._wordnet.cache_clear()


def test_training_reads_the_augmented_rows(tiny_overrides, tmp_path):
    import json

    import sftlab

    run = sftlab.train(load_config(None, tiny_overrides + ["train.epochs=1", "data.k_shot=4",
                                                           "data.augment.copies=3"]))
    data = json.loads((run / "summary.json").read_text())["data"]["train"]
    assert data["rows"] == 8 * 4 and "+ 3 eda copies of each of 8 rows" in data["source"]
    assert data["labels"] == {"negative": 16, "positive": 16}

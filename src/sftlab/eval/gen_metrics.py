"""Metrics on generated text: exact match, label accuracy (parsed from free text), BLEU, ROUGE-L, perplexity.

Every metric takes parallel lists `preds` (model outputs) and `refs` (references). Exact match and label accuracy
are fractions in [0, 1]; BLEU is sacrebleu's corpus score in [0, 100]; ROUGE-L is the mean per-example F-measure in
[0, 1]. Empty inputs score 0.0.
"""
from __future__ import annotations

import math
import re
import string
from functools import lru_cache

_TRAILING_PUNCT = string.punctuation + "\u2026\u3002\uff01\uff1f"  # ASCII punctuation, ellipsis, CJK . ! ?


def _check(preds, refs) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")


def normalize(text: str) -> str:
    """Strip, lowercase, collapse whitespace, drop trailing punctuation: "  The  Cat. " -> "the cat"."""
    text = " ".join(text.lower().split())
    return text.rstrip(_TRAILING_PUNCT).rstrip()


def exact_match(preds: list[str], refs: list[str]) -> float:
    _check(preds, refs)
    if not preds:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(preds)


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label (spelled as in `labels`) whose whole-word, case-insensitive match starts earliest in `text`; on a tie
    at the same position the longer label wins ("not good" over "not"). None when no label appears."""
    best: tuple[int, int] | None = None
    found = None
    for label in labels:
        m = _label_pattern(label).search(text)
        if m and (best is None or (m.start(), -len(label)) < best):
            best, found = (m.start(), -len(label)), label
    return found


@lru_cache(maxsize=1024)
def _label_pattern(label: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(label.strip()) + r"(?!\w)", re.IGNORECASE)


def label_accuracy(preds: list[str], refs: list[str], labels: list[str]) -> tuple[float, list[str | None]]:
    """(accuracy, parsed): parsed[i] = parse_label(preds[i], labels); an unparsed output counts as wrong. A parsed
    label matches its reference case-insensitively, ignoring surrounding whitespace."""
    _check(preds, refs)
    parsed = [parse_label(p, labels) for p in preds]
    if not preds:
        return 0.0, parsed
    correct = sum(p is not None and p.strip().lower() == str(r).strip().lower() for p, r in zip(parsed, refs))
    return correct / len(preds), parsed


def bleu(preds: list[str], refs: list[str]) -> float:
    """sacrebleu corpus BLEU (default 13a tokenization), 0-100."""
    import sacrebleu

    _check(preds, refs)
    if not preds:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_scores(preds: list[str], refs: list[str]) -> list[float]:
    """Per-example ROUGE-L F-measure (stemmed), in input order."""
    _check(preds, refs)
    scorer = _rouge_scorer()
    return [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(preds, refs)]


def rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean per-example ROUGE-L F-measure, 0-1."""
    scores = rouge_l_scores(preds, refs)
    return sum(scores) / len(scores) if scores else 0.0


def perplexity(mean_token_nll: float) -> float:
    """exp(mean per-token negative log-likelihood, in nats); inf when that overflows."""
    try:
        return math.exp(mean_token_nll)
    except OverflowError:
        return math.inf


def generation_metrics(preds: list[str], refs: list[str], labels: list[str] | None = None) -> dict[str, float]:
    """exact_match, bleu, rouge_l, and label_accuracy when `labels` is given."""
    out = {"exact_match": exact_match(preds, refs), "bleu": bleu(preds, refs), "rouge_l": rouge_l(preds, refs)}
    if labels:
        out["label_accuracy"] = label_accuracy(preds, refs, labels)[0]
    return out


def worst_examples(preds: list[str], refs: list[str], k: int) -> list[dict]:
    """The k examples with the lowest ROUGE-L (ties: input order), for error analysis:
    [{"index", "pred", "ref", "rouge_l"}, ...] ascending by score."""
    scores = rouge_l_scores(preds, refs)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:max(k, 0)]
    return [{"index": i, "pred": preds[i], "ref": refs[i], "rouge_l": scores[i]} for i in order]

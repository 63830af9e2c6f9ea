"""EDA: Easy Data Augmentation (Wei & Zou, EMNLP 2019, "EDA: Easy Data Augmentation Techniques for Boosting
Performance on Text Classification Tasks"; reference code jasonwei20/eda_nlp).

Each copy of a row applies one of the four operations to its text: synonym replacement (n = alpha_sr * words
non-stop words, every occurrence replaced by one WordNet synonym), random insertion (n synonyms of random words at
random places), random swap (n swaps) and random deletion (each word with probability p_rd). The paper's default
for small data is alpha = 0.1 for all four and 16 copies below 500 rows per class (4 above).

Departures from the reference, on purpose:
- Edits are a pure function of (seed, the row's file line, copy) (numpy generators seeded with that triple), never
  of Python's set order: the reference draws synonyms from `list(set(...))`, whose order changes with
  PYTHONHASHSEED, so its copies differ between two runs. Resume and 2 processes stay exact here.
- The text keeps its case and punctuation (the reference lowercases and strips everything but letters first,
  which shifts the train distribution away from the unedited dev text the encoder will see).
- A rate of 0 makes no edit (the reference edits max(1, int(alpha * n)) words even for tiny alpha): all rates 0
  is the identity, which the tests check.
- Pair tasks: only the first text (data.text) is edited: deleting or replacing words of an NLI hypothesis can
  flip its label, which the paper (single sentences only) never tested.

WordNet comes from a folder holding the WordNet 3.0 database (data.noun, index.noun, ...): SFTLAB_WORDNET, else
Debian's wordnet-base (/usr/share/wordnet), read by nltk's WordNetCorpusReader; nothing is downloaded.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .examples import Example

# NLTK's English stop-word list (the reference's), kept out of synonym replacement and insertion.
STOP = frozenset("""i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves what which who whom this that these those am is are was
were be been being have has had having do does did doing a an the and but if or because as until while of at by for
with about against between into through during before after above below to from up down in out on off over under
again further then once here there when where why how all any both each few more most other some such no nor not only
own same so than too very s t can will just don should now""".split())
WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")
OPS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")


def wordnet_folder() -> Path:
    folder = Path(os.environ.get("SFTLAB_WORDNET", "/usr/share/wordnet"))
    if not (folder / "data.noun").is_file():
        raise ConfigError(f"data.augment eda needs the WordNet 3.0 database and {folder} has none: apt-get install "
                          "wordnet-base (Debian), or set SFTLAB_WORDNET to a folder holding data.noun, index.noun, ...")
    return folder


# WordNet 3.0's lexicographer files (lexnames(5WN)), which nltk's reader opens first. Debian's wordnet-base ships
# the database without this small file, so the reader gets it from here when the folder lacks it.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()
_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


@functools.lru_cache(maxsize=1)
def _wordnet():
    import io
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    folder = wordnet_folder()

    class Reader(WordNetCorpusReader):
        def open(self, file):
            if file == "lexnames" and not (folder / file).is_file():
                return io.StringIO("".join(f"{i:02d}\t{n}\t{_POS[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES)))
            return super().open(file)

        def map_wn(self, version="wordnet"):  # the OMW mapping needs nltk's own download; English lemmas do not
            return None

    if str(folder) not in nltk.data.path:  # nltk >= 3.9 reads only below its data paths (nltk/pathsec.py)
        nltk.data.path.append(str(folder))
    with warnings.catch_warnings():  # "multilingual functions are not available": we read English lemmas only
        warnings.simplefilter("ignore", UserWarning)
        return Reader(str(folder), None)


@functools.lru_cache(maxsize=65536)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet lemmas of every synset of `word` (lowercased), without the word, sorted: a fixed order to draw from."""
    found = {lemma.name().replace("_", " ").lower() for syn in _wordnet().synsets(word.lower())
             for lemma in syn.lemmas()}
    return tuple(sorted(s for s in found if s != word.lower() and re.fullmatch(r"[a-z][a-z '-]*", s)))


def _n(rate: float, words: int) -> int:
    return 0 if rate <= 0 else max(1, int(rate * words))


def edit(text: str, op: str, rate: float, rng: np.random.Generator) -> str:
    if rate <= 0:
        return text
    words = text.split()
    if op == "synonym_replacement":
        n, done = _n(rate, len(words)), 0
        candidates = sorted({w for w in words if WORD.match(w) and w.lower() not in STOP})
        for i in rng.permutation(len(candidates)):
            if done >= n:
                break
            syn = synonyms(candidates[i])
            if syn:
                pick = syn[rng.integers(len(syn))]
                words = [pick if w == candidates[i] else w for w in words]
                done += 1
    elif op == "random_insertion":
        for _ in range(_n(rate, len(words))):
            content = [w for w in words if WORD.match(w) and w.lower() not in STOP]
            for _try in range(10 if content else 0):  # the reference's bound; it also draws stop words ("was" ->
                syn = synonyms(content[rng.integers(len(content))])  # "live"), which only adds noise
                if syn:
                    words.insert(int(rng.integers(len(words) + 1)), syn[rng.integers(len(syn))])
                    break
    elif op == "random_swap":
        for _ in range(_n(rate, len(words)) if len(words) > 1 else 0):
            i, j = rng.choice(len(words), 2, replace=False)
            words[i], words[j] = words[j], words[i]
    elif op == "random_deletion" and rate > 0 and len(words) > 1:
        kept = [w for w in words if rng.random() > rate]
        words = kept or [words[rng.integers(len(words))]]
    return " ".join(words) if words else text


def augment(examples: list[Example], cfg) -> list[Example]:
    """The rows followed by `cfg.copies` edited copies of each (same label); copy c of a row uses operation
    (c + o) mod 4, o drawn per row, so every row gets every operation once per four copies."""
    rates = {"synonym_replacement": cfg.alpha_sr, "random_insertion": cfg.alpha_ri, "random_swap": cfg.alpha_rs,
             "random_deletion": cfg.p_rd}
    if any(rates.values()):
        _wordnet()  # a missing database fails before any work
    out = list(examples)
    for e in examples:
        offset = int(np.random.default_rng([cfg.seed, e.line]).integers(4))
        for c in range(cfg.copies):
            op = OPS[(c + offset) % 4]
            rng = np.random.default_rng([cfg.seed, e.line, c])
            out.append(Example(edit(e.text, op, rates[op], rng), e.text_pair, e.label, e.line))
    return out

"""Raw text for self-supervised tasks (masked LM): one text column of any supported table format, or a plain `.txt`
file with one text per line (blank lines skipped). Labels are never read."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DataError
from .batches import encode
from .examples import Example, Split, load_split, resolve_path


def load_text(d, path: str, *, limit: int | None = None) -> Split:
    source = resolve_path(d, path)
    if source.endswith(".txt") and Path(source).is_file():
        lines = Path(source).read_text(encoding="utf-8", errors="replace").splitlines()
        split = Split(source, [])
        for n, line in enumerate(lines, start=1):
            if line.strip():
                split.examples.append(Example(line.strip(), None, None, n))
                if limit is not None and len(split.examples) >= limit:
                    break
        split.skipped["blank line"] = sum(1 for x in lines if not x.strip())
        if not split.skipped["blank line"]:
            del split.skipped["blank line"]
        if not split.examples:
            raise DataError(f"{source}: no text (every line is blank); a .txt file holds one text per line")
        return split
    try:
        split, _ = load_split(d, path, "masked_lm", None, limit=limit, need_label=False)
    except DataError as e:
        hint = "; name the text column with data.text" if "no column" in str(e) else ""
        raise DataError(f"{e}{hint}") from None
    return split


def prepare_masked(cfg, tokenizer, splits):
    """Train / dev / test text encoded for masked LM (tasks/masked_lm.py): masks are drawn per batch, not here."""
    from ..tasks.masked_lm import MaskedEncoded
    from .prepare import Prepared

    if tokenizer.mask_token_id is None:
        raise ConfigError(f"task masked_lm: the tokenizer of {cfg.model.name} has no mask token (a decoder?); use an "
                          "encoder with one (minilm-l6, BERT, RoBERTa), or task causal_lm to adapt a decoder")
    d = cfg.data
    limits = {"train": d.limit_train, "dev": d.limit_dev, "test": None}
    out = Prepared(labels=None)
    for name in splits:
        path = getattr(d, name)
        if path is None:
            continue
        cols = d.model_copy(update=d.dev_columns) if d.dev_columns and name != "train" else d
        split = load_text(cols, path, limit=limits[name])
        enc = encode(tokenizer, split.examples, d.max_length)
        out.splits[name] = split
        out.encoded[name] = MaskedEncoded(
            **vars(enc), seed=cfg.train.seed, probability=d.mlm_probability, mask_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer), specials=tuple(sorted(set(tokenizer.all_special_ids))),
            word_ids=_word_ids(tokenizer, split.examples, d.max_length) if d.whole_word_mask else None)
    return out


def _word_ids(tokenizer, examples: list[Example], max_length: int) -> list[list[int]]:
    """Per token the index of its word within the row (second text's words after the first's), -1 for specials."""
    if not tokenizer.is_fast:
        raise ConfigError("data.whole_word_mask needs a fast tokenizer (word boundaries); this model's is slow")
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    out = []
    for i in range(len(texts)):
        words, seqs = enc.word_ids(i), enc.sequence_ids(i)
        first = 1 + max((w for w, s in zip(words, seqs) if w is not None and s == 0), default=-1)
        out.append([-1 if w is None else w + (first if s == 1 else 0) for w, s in zip(words, seqs)])
    return out


def encode_lm_text(tokenizer, split: Split, max_length: int):
    """Raw text for causal-LM continued pre-training: each text + a document separator, cut into max_length
    pieces (nothing is lost to truncation), every token after a text's first a target once; packing then fills
    rows best-fit.

    The separator is `<|endoftext|>` when the vocabulary has it (the document boundary of GPT-2-style and SmolLM2
    pre-training; an instruct model's eos is its end-of-turn token, which would teach turn ends inside prose), else
    the eos token."""
    from .lm import LMEncoded, build

    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if sep is None or sep == tokenizer.unk_token_id:
        sep = tokenizer.eos_token_id
    ids: list[list[int]] = []
    for at in range(0, len(split.examples), 256):  # batches: the Rust tokenizer uses its threads
        chunk = [e.text for e in split.examples[at: at + 256]]
        for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            row = row + ([sep] if sep is not None else [])
            # Pieces overlap by one token: a piece's last token is the next one's first input, so each token after
            # the first is a target exactly once and no prediction is lost at a cut.
            ids += [row[k: k + max_length] for k in range(0, max(1, len(row) - 1), max_length - 1)]
    enc: LMEncoded = build(ids, [[1] * len(x) for x in ids], {})
    enc.examples = len(split.examples)
    return enc


def prepare_embedding(cfg, tokenizer, splits):
    """Train: raw text (load_text). Dev / test: sentence pairs with a gold score (data.dev_columns names them)."""
    from .prepare import Prepared

    d = cfg.data
    out = Prepared(labels=None)
    limits = {"train": d.limit_train, "dev": d.limit_dev, "test": None}
    for name in splits:
        path = getattr(d, name)
        if path is None:
            continue
        if name == "train":
            split = load_text(d, path, limit=limits[name])
            out.splits[name], out.encoded[name] = split, encode(tokenizer, split.examples, d.max_length)
            continue
        out.encoded[name] = scored_pairs(d.model_copy(update=d.dev_columns or {}), path, tokenizer, limit=limits[name])
        out.splits[name] = out.encoded[name].split
    return out


def scored_pairs(cols, path: str, tokenizer, *, limit: int | None = None):
    """A pair file (text, text_pair, numeric label) as ScoredPairs for task embedding's evaluation."""
    from ..tasks.embedding import ScoredPairs

    if cols.text_pair is None:
        raise ConfigError(f"{path}: task embedding is judged on sentence pairs with a similarity score; name the "
                          "dev file's columns, e.g. data.dev_columns={text: sentence1, text_pair: sentence2, "
                          "label: score}")
    split, _ = load_split(cols, path, "regression", None, limit=limit)
    a = encode(tokenizer, [Example(e.text, None, None, e.line) for e in split.examples], cols.max_length)
    b = encode(tokenizer, [Example(e.text_pair, None, None, e.line) for e in split.examples], cols.max_length)
    pairs = ScoredPairs(a, b, [e.label for e in split.examples])
    pairs.split = split
    return pairs

"""The k-shot protocol (issue 19): exactly K labelled rows per class, drawn from the training file.

Each class's rows (file order) are shuffled once by a generator seeded with (k_shot_seed, class id); the sample is
the first K of that order and a "true few-shot" dev set (Perez et al. 2021, "True Few-Shot Learning with Language
Models": no large dev set to choose settings on) is the last K_dev. So the K-shot sample of a seed is inside its
2K-shot sample (nested, as in LM-BFF's and SetFit's protocols, which makes K = 8 -> 64 curves one sample growing,
not five unrelated draws), and the dev rows are the same for every K and never in a training sample.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from .examples import Split


def class_order(split: Split, n_classes: int, seed: int) -> list[list[int]]:
    """Per class, the row indices of `split` in the order the sample takes them."""
    by_class: list[list[int]] = [[] for _ in range(n_classes)]
    for i, e in enumerate(split.examples):
        by_class[e.label].append(i)
    return [[rows[j] for j in np.random.default_rng([seed, c]).permutation(len(rows))]
            for c, rows in enumerate(by_class)]


def take_k_shot(split: Split, names: list[str], k: int, seed: int, k_dev: int | None = None
                ) -> tuple[Split, Split | None]:
    """(the K-per-class training split, the K_dev-per-class dev split or None), rows kept in file order."""
    order = class_order(split, len(names), seed)
    need = k + (k_dev or 0)
    short = [(names[c], len(rows)) for c, rows in enumerate(order) if len(rows) < need]
    if short:
        what = f"data.k_shot={k}" + (f" + data.k_shot_dev={k_dev}" if k_dev else "")
        raise DataError(f"{split.source}: {what} needs {need} rows per class, but "
                        + ", ".join(f"class {n!r} has {m}" for n, m in short)
                        + f"; lower data.k_shot (at most {min(len(r) for r in order) - (k_dev or 0)})")
    train = sorted(i for rows in order for i in rows[:k])
    out = Split(f"{split.source} (k_shot={k}, seed={seed})", [split.examples[i] for i in train], split.skipped)
    if not k_dev:
        return out, None
    dev = sorted(i for rows in order for i in rows[len(rows) - k_dev:])
    return out, Split(f"{split.source} (k_shot_dev={k_dev}, seed={seed})", [split.examples[i] for i in dev])


def labelled_sample(cfg) -> tuple[Split, Split | None, "LabelMap"]:
    """A classification config's labelled training rows as `prepare` reads them, before augmentation (data.limit_train,
    then data.k_shot), its k_shot_dev rows (or None) and the label map: what self-training and LM augmentation
    start from."""
    from .examples import load_split

    d = cfg.data
    train, labels = load_split(d, d.train, "classification", None, limit=d.limit_train)
    dev = None
    if d.k_shot:
        train, dev = take_k_shot(train, labels.names, d.k_shot, d.k_shot_seed, d.k_shot_dev)
    return train, dev, labels

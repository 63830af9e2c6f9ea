"""In-context learning: seeded, label-balanced shot selection and chat-style few-shot messages."""
from __future__ import annotations

import random
from collections.abc import Collection

from ..errors import ConfigError


def select_shots(examples: list[dict], k: int, seed: int, label_key: str | None = "label", *,
                 exclude: Collection = (), id_key: str = "id", query: dict | None = None) -> list[dict]:
    """k demonstration examples, deterministic for (examples, k, seed).

    Candidates are `examples` minus: positions listed in `exclude`, examples whose `id_key` value is in `exclude`,
    and any example equal to `query` -- so the query itself is never its own demonstration.

    With labels (`label_key` set and present on every candidate) the shots are label-balanced: labels in sorted
    order, each label's pool shuffled with a generator seeded by (seed, label), then taken round-robin
    (A, B, A, B, ...); when k is not a multiple of the label count the earlier labels get one more, and an
    exhausted label is skipped. Otherwise the shots are `random.Random(seed).sample(candidates, k)`.
    Returns the example dicts themselves, in selection order.
    """
    if k < 0:
        raise ConfigError(f"the number of shots must be >= 0, got {k}")
    excluded = set(exclude)
    candidates = [ex for i, ex in enumerate(examples) if i not in excluded
                  and not _id_excluded(ex, id_key, excluded) and not (query is not None and ex == query)]
    if k > len(candidates):
        raise ConfigError(f"asked for {k} shots but only {len(candidates)} candidate examples remain after excluding "
                          f"the query; lower k or add examples")
    if k == 0:
        return []
    if label_key is None or not all(label_key in ex for ex in candidates):
        return random.Random(seed).sample(candidates, k)

    pools: dict = {}
    for ex in candidates:
        pools.setdefault(ex[label_key], []).append(ex)
    labels = _sorted_labels(pools)
    for label in labels:
        random.Random(f"{seed}\x00{label!r}").shuffle(pools[label])  # str seeds are stable across processes
    shots: list[dict] = []
    depth = 0
    while len(shots) < k:
        for label in labels:
            if depth < len(pools[label]) and len(shots) < k:
                shots.append(pools[label][depth])
        depth += 1
    return shots


def _id_excluded(ex: dict, id_key: str, excluded: set) -> bool:
    try:
        return id_key in ex and ex[id_key] in excluded
    except TypeError:  # unhashable id
        return False


def _sorted_labels(pools: dict) -> list:
    try:
        return sorted(pools)
    except TypeError:  # mixed label types
        return sorted(pools, key=repr)


def build_icl_messages(shots: list[tuple[str, str]], query: str, system: str | None = None) -> list[dict]:
    """Chat-style few-shot: [system], then each (input, output) shot as a user turn and an assistant turn, then the
    query as the final user turn -- ready for `tokenizer.apply_chat_template(..., add_generation_prompt=True)`."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    for user, assistant in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": query})
    return messages

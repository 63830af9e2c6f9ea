"""Labelled columns -> prompt/completion rows for instruction tuning (e.g. SST-2 as a question).

`data.prompt: "Is the sentiment of this review positive or negative?\\n\\n{sentence}"`,
`data.completion: "{label}"`, `data.label_words: {"0": negative, "1": positive}`.
"""
from __future__ import annotations

import string

from ..config import DataConfig
from ..errors import DataError
from .read import Table


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def to_prompt_completion(table: Table, cfg: DataConfig) -> Table:
    fields = set(template_fields(cfg.prompt) + template_fields(cfg.completion))
    rows = []
    for line, row in table.rows:
        values = row if isinstance(row, dict) else dict(zip(table.columns or [], row))
        missing = sorted(f for f in fields if f not in values)
        if missing:
            raise DataError(f"{table.source}:{line}: no column {missing[0]!r} for data.prompt/completion; "
                            f"columns are {sorted(values)}")
        values = {k: ("" if v is None else str(v).strip()) for k, v in values.items()}
        if cfg.label_words and "label" in values:
            raw = values["label"]
            if raw not in cfg.label_words:
                raise DataError(f"{table.source}:{line}: label {raw!r} not in data.label_words {cfg.label_words}")
            values["label"] = cfg.label_words[raw]
        rows.append((line, {"prompt": cfg.prompt.format(**values), "completion": cfg.completion.format(**values)}))
    return Table(table.source, None, rows, table.bad)

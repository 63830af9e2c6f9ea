"""Map columns and validate every row into Examples; build the label map.

Default policy: the first bad row stops the run with file:line and the reason (before any training).
With `data.skip_invalid: true` bad rows are skipped and counted by reason.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .read import Table, is_missing, read_table


@dataclass
class Example:
    text: str
    text_pair: str | None
    label: int | float | None  # class id, regression target, or None (unlabelled prediction input)
    line: int


@dataclass
class Split:
    source: str
    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)  # reason -> rows


def resolve_path(cfg: DataConfig, path: str) -> str:
    if path.startswith("hf:") or Path(path).is_absolute():
        return path
    base = cfg.dir or os.environ.get("SFTLAB_DATA_DIR")
    if not base:
        return path
    joined = Path(base) / path
    # A path that exists only relative to the working directory (e.g. `eval --data src/sftlab/demo/dev.jsonl` typed
    # while SFTLAB_DATA_DIR points at a dataset folder) is the file the user meant; otherwise the data dir wins.
    return path if not joined.exists() and Path(path).exists() else str(joined)


def _header(cfg: DataConfig) -> bool:
    if cfg.header != "auto":
        return bool(cfg.header)
    return any(isinstance(c, str) for c in (cfg.text, cfg.text_pair, cfg.label) if c is not None)


def _column_getter(table: Table, ref: str | int, key: str):
    """Returns row -> value for a column given by name or index; unknown columns fail once, up front."""
    if table.columns is None and table.rows and isinstance(table.rows[0][1], dict):
        if isinstance(ref, int):
            raise DataError(f"{table.source}: data.{key}={ref} is an index but rows are JSON objects; use a name")
        known = set().union(*(r.keys() for _, r in table.rows[:100]))
        if ref not in known:
            raise DataError(f"{table.source}: no column {ref!r} (data.{key}); columns are {sorted(known)}")
        return lambda row: row.get(ref)
    if table.columns is None:  # headerless CSV/TSV
        if not isinstance(ref, int):
            raise DataError(f"{table.source}: data.{key}={ref!r} is a name but the file has no header; use an index")
        return lambda row: row[ref] if ref < len(row) else None
    if isinstance(ref, int):
        if ref >= len(table.columns):
            raise DataError(f"{table.source}: data.{key}={ref} but the file has {len(table.columns)} columns")
        idx = ref
    elif table.columns.count(ref) > 1:
        raise DataError(f"{table.source}: column {ref!r} (data.{key}) appears {table.columns.count(ref)} times in the "
                        f"header; rename the copies, or name the column by its 0-based index")
    elif ref in table.columns:
        idx = table.columns.index(ref)
    else:
        raise DataError(f"{table.source}: no column {ref!r} (data.{key}); columns are {table.columns}")
    if isinstance(table.rows[0][1] if table.rows else [], dict):
        name = table.columns[idx]
        return lambda row: row.get(name)
    return lambda row: row[idx]


class LabelMap:
    """Class names in id order. Raw labels match a name first, then an integer id within range."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_raw(cls, values: list[Any]) -> "LabelMap":
        found = {_label_str(v) for v in values if not is_missing(v) and _label_str(v) != ""}
        if all(_as_int(v) is not None for v in found):
            return cls(sorted(found, key=lambda v: _as_int(v)))
        return cls(sorted(found))

    def encode(self, raw: Any) -> int:
        s = _label_str(raw)
        if s in self.index:
            return self.index[s]
        i = _as_int(s)
        if i is not None and str(i) not in self.index and not any(_as_int(n) is not None for n in self.names):
            if 0 <= i < len(self.names):
                return i
            raise ValueError(f"label id {i} out of range 0..{len(self.names) - 1}")
        raise ValueError(f"unknown label {s!r}; known labels are {self.names} (set data.labels to add classes)")


def _label_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _as_int(s: str) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None


def _text(value: Any, key: str) -> str:
    if is_missing(value):
        raise ValueError(f"missing {key} (data.{key})")
    if not isinstance(value, str):  # a number or a list is not a text: the wrong column, or a broken export
        kind = "a list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"wrong type ({key} is {kind}, not text; data.{key} must name a column of strings)")
    if not value.strip():
        raise ValueError(f"empty {key} (data.{key})")
    return value


def _target(value: Any) -> float:
    if is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise ValueError("missing regression target (data.label)")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"regression target {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"regression target is {x}; targets must be finite numbers")
    return x


def load_split(
    cfg: DataConfig, path: str, task: str, labels: LabelMap | None, *, limit: int | None = None, need_label=True
) -> tuple[Split, LabelMap | None]:
    """Read and validate one file. For classification without `labels`, the map is built from this file."""
    source = resolve_path(cfg, path)
    table = read_table(source, header=_header(cfg), skip_invalid=cfg.skip_invalid)
    if not table.rows:
        raise DataError(f"{source}: no data rows (only a header?)")
    get_text = _column_getter(table, cfg.text, "text")
    get_pair = _column_getter(table, cfg.text_pair, "text_pair") if cfg.text_pair is not None else None
    get_label = _column_getter(table, cfg.label, "label") if need_label else None
    if task == "classification" and labels is None and get_label is not None:
        labels = LabelMap(cfg.labels) if cfg.labels else LabelMap.from_raw([get_label(r) for _, r in table.rows])
        if len(labels.names) < 2:
            raise DataError(f"{source}: found {len(labels.names)} distinct label(s) {labels.names}; need >= 2")
    split = Split(source, [])
    for line, reason in table.bad:
        split.skipped[reason.split(" (")[0]] += 1
    for line, row in table.rows:
        try:
            text = _text(get_text(row), "text")
            pair = _text(get_pair(row), "text_pair") if get_pair else None
            label = None
            if get_label is not None:
                raw = get_label(row)
                if task == "classification":
                    if is_missing(raw) or not str(raw).strip():
                        raise ValueError("missing label (data.label)")
                    label = labels.encode(raw)
                else:
                    label = _target(raw)
        except ValueError as e:
            if not cfg.skip_invalid:
                raise DataError(f"{source}:{line}: {e}; fix the row or set data.skip_invalid=true") from None
            split.skipped[_reason_kind(str(e))] += 1
            continue
        split.examples.append(Example(text, pair, label, line))
        if limit is not None and len(split.examples) >= limit:
            break
    if not split.examples:
        raise DataError(f"{source}: no valid rows left ({dict(split.skipped)})")
    return split, labels


def _reason_kind(message: str) -> str:
    """Skip counts by kind, not by bad value: "unknown label 'x'; ..." -> "unknown label"."""
    head = message.split(";")[0].split(" (")[0]
    for kind in ("unknown label", "label id", "regression target"):
        if head.startswith(kind):
            return kind
    return head

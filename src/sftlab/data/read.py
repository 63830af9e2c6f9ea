"""Read labelled files into rows: CSV, TSV (GLUE layouts, with or without header), JSONL/JSON, Parquet, hub.

Every row keeps the line number it came from so a bad row can be reported as file:line.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class Table:
    """Rows of one file. `rows[i] = (line, values)`; values is a list (csv/tsv) or dict (json, parquet)."""

    source: str
    columns: list[str] | None
    rows: list[tuple[int, Any]]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) found while reading


def read_table(path: str, *, header: bool, skip_invalid: bool) -> Table:
    if path.startswith("hf:"):
        return _read_hub(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found; check data.train/dev/test and data.dir")
    if p.is_dir():
        raise DataError(f"{path}: is a folder; point data.* at a file (.csv .tsv .jsonl .json .parquet)")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type {p.suffix!r}; use one of {', '.join(sorted(FORMATS))}")
    if fmt == "parquet":
        return _read_parquet(p)
    lines, bad = _decode_lines(p, skip_invalid)
    if not any(line.strip() for _, line in lines):
        raise DataError(f"{path}: file is empty; it needs at least one data row")
    if fmt in ("csv", "tsv"):
        return _read_delimited(p, lines, bad, fmt, header, skip_invalid)
    return _read_json(p, lines, bad, skip_invalid)


def _decode_lines(p: Path, skip_invalid: bool) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Split bytes into numbered text lines; a BOM is dropped; undecodable lines are bad rows."""
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines, bad = [], []
    try:  # the usual case in one call (issue 22: a third of reading SST-2's 67k rows went to per-line decoding)
        lines = [(i, line.rstrip("\r")) for i, line in enumerate(raw.decode("utf-8").split("\n"), start=1)]
    except UnicodeDecodeError:
        pass
    for i, chunk in enumerate(raw.split(b"\n") if not lines else (), start=1):
        try:
            lines.append((i, chunk.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 (byte 0x{chunk[e.start]:02x} at column {e.start + 1}); re-save the file as UTF-8"
            if not skip_invalid:
                raise DataError(f"{p}:{i}: {reason}") from None
            bad.append((i, reason))
    if lines and lines[-1][1] == "":
        lines.pop()
    return lines, bad


def _read_delimited(p, lines, bad, fmt, header, skip_invalid) -> Table:
    # GLUE TSVs are quoting-free (a lone " inside a sentence is text); CSV uses standard quoting.
    delim = "," if fmt == "csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
    records: list[tuple[int, list[str]]] = []
    if fmt == "tsv":
        records = [(i, line.split("\t")) for i, line in lines if line.strip()]
    else:
        reader = csv.reader((line for _, line in lines), delimiter=delim, quoting=quoting)
        numbers = [i for i, _ in lines]
        try:
            for values in reader:
                if values:
                    records.append((numbers[reader.line_num - 1], values))
        except csv.Error as e:
            raise DataError(f"{p}:{numbers[min(reader.line_num, len(numbers)) - 1]}: malformed CSV ({e})") from None
    columns = None
    if header:
        (_, columns), records = records[0], records[1:]
        columns = [c.strip() for c in columns]
    width = len(columns) if columns else max((len(v) for _, v in records), default=0)
    rows = []
    for i, values in records:
        if columns and len(values) != width:
            reason = f"has {len(values)} fields, the header has {width}; fix the row or its tabs/quotes"
            if not skip_invalid:
                raise DataError(f"{p}:{i}: {reason}")
            bad.append((i, reason))
            continue
        rows.append((i, values))
    return Table(str(p), columns, rows, bad)


def _read_json(p, lines, bad, skip_invalid) -> Table:
    text = "\n".join(line for _, line in lines).lstrip()
    if p.suffix.lower() == ".json" and text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
        rows = []
        for n, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                reason = f"item {n} is a {type(item).__name__}, expected a JSON object"
                if not skip_invalid:
                    raise DataError(f"{p}:{n}: {reason} (line = item number in a JSON array)")
                bad.append((n, reason))
                continue
            rows.append((n, item))
        return Table(str(p), None, rows, bad)
    rows = []
    for i, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        except (json.JSONDecodeError, ValueError) as e:
            reason = f"malformed JSON line ({getattr(e, 'msg', e)}); each line must be one JSON object"
            if not skip_invalid:
                raise DataError(f"{p}:{i}: {reason}") from None
            bad.append((i, reason))
            continue
        rows.append((i, value))
    return Table(str(p), None, rows, bad)


def _read_parquet(p: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if not records:
        raise DataError(f"{p}: file is empty; it needs at least one data row")
    return Table(str(p), None, [(n + 1, r) for n, r in enumerate(records)])


def _read_hub(spec: str) -> Table:
    """`hf:NAME[:CONFIG]:SPLIT` through `datasets` (needs a network or a local cache)."""
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise DataError(f"{spec}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, split, config = parts[0], parts[-1], (parts[1] if len(parts) == 3 else None)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, unknown split
        raise DataError(f"{spec}: could not load from the hub ({str(e).splitlines()[0][:200]})") from None
    return Table(spec, list(ds.column_names), [(n + 1, r) for n, r in enumerate(ds)])


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))

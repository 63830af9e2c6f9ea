"""Bad rows stop the run with file:line and a fix by default; with data.skip_invalid they are skipped and counted."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from tests.conftest import make_rows, write_jsonl
from sftlab.cli import main
from sftlab.config import DataConfig
from sftlab.data.examples import load_split
from sftlab.errors import DataError

GOOD = [b'{"text": "a fine film", "label": "pos"}', b'{"text": "a dull film", "label": "neg"}']
SKIP_HINT = "fix the row or set data.skip_invalid=true"


@dataclass
class Bad:
    name: str
    ext: str
    lines: list[bytes]  # the file, one entry per line; exactly one of them is bad
    bad_line: int  # 1-based
    reason: str  # substring of the error message
    hint: str = SKIP_HINT
    task: str = "classification"
    data: dict = field(default_factory=dict)


def jsonl(bad: bytes, at: int = 3) -> list[bytes]:
    rows = GOOD * 2
    return rows[: at - 1] + [bad] + rows[at - 1 :]


CASES = [
    Bad("non_utf8_jsonl", ".jsonl", jsonl(b'{"text": "caf\xe9 au lait", "label": "pos"}'), 3,
        "not valid UTF-8 (byte 0xe9 at column 14)", hint="re-save the file as UTF-8"),
    Bad("non_utf8_csv", ".csv", [b"text,label", b"good,pos", b"bad,neg", b"\xff\xfe,pos", b"ok,neg"], 4,
        "not valid UTF-8 (byte 0xff at column 1)", hint="re-save the file as UTF-8"),
    Bad("empty_text", ".jsonl", jsonl(b'{"text": "", "label": "pos"}'), 3, "empty text (data.text)"),
    Bad("whitespace_text", ".jsonl", jsonl(b'{"text": "  \\t \\n ", "label": "pos"}', at=2), 2,
        "empty text (data.text)"),
    Bad("whitespace_text_csv", ".csv", [b"text,label", b"good,pos", b"bad,neg", b"   ,pos"], 4, "empty text"),
    Bad("missing_text_key", ".jsonl", jsonl(b'{"label": "pos"}', at=5), 5, "missing text (data.text)"),
    Bad("null_text", ".jsonl", jsonl(b'{"text": null, "label": "pos"}'), 3, "missing text (data.text)"),
    Bad("missing_pair", ".jsonl", [b'{"t": "a", "p": "b", "y": "x"}', b'{"t": "a", "y": "z"}',
                                   b'{"t": "a", "p": "b", "y": "z"}'], 2, "missing text_pair (data.text_pair)",
        data={"text": "t", "text_pair": "p", "label": "y"}),
    Bad("missing_label_key", ".jsonl", jsonl(b'{"text": "no label here"}'), 3, "label"),
    Bad("null_label", ".jsonl", jsonl(b'{"text": "no label here", "label": null}'), 3, "label"),
    Bad("empty_label_csv", ".csv", [b"text,label", b"good,pos", b"bad,neg", b"what,"], 4, "label"),
    Bad("label_id_out_of_range", ".jsonl", jsonl(b'{"text": "x", "label": 5}', at=4), 4,
        "label id 5 out of range 0..1", data={"labels": ["neg", "pos"]}),
    Bad("unknown_label_with_explicit_labels", ".jsonl", jsonl(b'{"text": "x", "label": "neu"}'), 3,
        "unknown label 'neu'; known labels are ['neg', 'pos']", data={"labels": ["neg", "pos"]}),
    Bad("nan_target_jsonl", ".jsonl", [b'{"text": "a", "label": 0.5}', b'{"text": "b", "label": NaN}'], 2,
        "missing regression target (data.label)", task="regression"),
    Bad("nan_target_csv", ".csv", [b"text,label", b"a,0.5", b"b,1.5", b"c,nan"], 4,
        "regression target is nan; targets must be finite", task="regression"),
    Bad("inf_target_csv", ".csv", [b"text,label", b"a,0.5", b"b,inf"], 3,
        "regression target is inf; targets must be finite", task="regression"),
    Bad("non_numeric_target", ".tsv", [b"text\tlabel", b"a\t0.5", b"b\thigh", b"c\t2"], 3,
        "regression target 'high' is not a number", task="regression"),
    Bad("missing_target", ".csv", [b"text,label", b"a,0.5", b"b,", b"c,2"], 3,
        "missing regression target (data.label)", task="regression"),
    Bad("ragged_tsv_row", ".tsv", [b"text\tlabel", b"good\tpos", b"bad\tneg", b"a\ttab\tpos"], 4,
        "has 3 fields, the header has 2", hint="fix the row or its tabs/quotes"),
    Bad("short_tsv_row", ".tsv", [b"text\tlabel", b"good\tpos", b"no tab here", b"bad\tneg"], 3,
        "has 1 fields, the header has 2", hint="fix the row or its tabs/quotes"),
    Bad("ragged_csv_row", ".csv", [b"text,label", b"good,pos", b"a,b,pos", b"bad,neg"], 3,
        "has 3 fields, the header has 2", hint="fix the row or its tabs/quotes"),
    Bad("malformed_json_line", ".jsonl", jsonl(b'{"text": "a", "label": '), 3, "malformed JSON line",
        hint="each line must be one JSON object"),
    Bad("json_line_not_object", ".jsonl", jsonl(b'["a fine film", "pos"]', at=4), 4,
        "malformed JSON line (expected a JSON object, got list)", hint="each line must be one JSON object"),
    Bad("json_line_scalar", ".jsonl", jsonl(b'"just text"', at=2), 2, "expected a JSON object, got str",
        hint="each line must be one JSON object"),
]


def write_case(tmp_path, case: Bad) -> str:
    p = tmp_path / f"{case.name}{case.ext}"
    p.write_bytes(b"\n".join(case.lines) + b"\n")
    return str(p)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_row_fails_with_file_line_and_fix(tmp_path, case):
    path = write_case(tmp_path, case)
    with pytest.raises(DataError) as exc:
        load_split(DataConfig(**case.data), path, case.task, None)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:{case.bad_line}: "), msg
    assert case.reason in msg and case.hint in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_row_skipped_and_counted(tmp_path, case):
    path = write_case(tmp_path, case)
    with pytest.raises(DataError) as exc:
        load_split(DataConfig(**case.data), path, case.task, None)
    split, _ = load_split(DataConfig(skip_invalid=True, **case.data), path, case.task, None)
    assert sum(split.skipped.values()) == 1
    (reason,) = split.skipped
    assert str(exc.value).startswith(f"{path}:{case.bad_line}: {reason}")  # counted under the error's own reason
    has_header = case.ext in (".csv", ".tsv")
    data_lines = set(range(1 + has_header, len(case.lines) + 1))
    assert [e.line for e in split.examples] == sorted(data_lines - {case.bad_line})


@pytest.mark.parametrize("row", [b'{"text": "x"}', b'{"text": "x", "label": null}', b'{"text": "x", "label": ""}'])
def test_missing_label_is_called_missing(tmp_path, row):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join(jsonl(row)) + b"\n")
    with pytest.raises(DataError) as exc:
        load_split(DataConfig(), str(p), "classification", None)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:3: missing label (data.label)"), msg


@pytest.mark.parametrize("lines,first,skipped", [
    # row-level problems (validated after reading)
    ([GOOD[0], b'{"text": " ", "label": "pos"}', GOOD[1], b'{"text": "x"}', GOOD[0], b'{"text": "", "label": "neg"}'],
     2, {"empty text": 2, "missing label": 1}),
    # read-level problems (found while reading)
    ([GOOD[0], GOOD[1], b"{oops", b"[1]", GOOD[0], b'"s"'], 3, {"malformed JSON line": 3}),
    ([GOOD[0], b"\xff", GOOD[1], b"\xfe\xff", GOOD[0]], 2, {"not valid UTF-8": 2}),
], ids=["rows", "json", "utf8"])
def test_first_bad_row_stops_and_all_are_counted_when_skipping(tmp_path, lines, first, skipped):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join(lines))  # no trailing newline: the last line still counts
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:{first}: "):
        load_split(DataConfig(), str(p), "classification", None)
    split, _ = load_split(DataConfig(skip_invalid=True), str(p), "classification", None)
    assert [e.line for e in split.examples] == [i + 1 for i, x in enumerate(lines) if x in GOOD]
    assert dict(split.skipped) == skipped


def test_unknown_label_in_dev(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(8))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_rows(3) + [{"text": "meh", "label": "neutral"}] + make_rows(2))
    _, labels = load_split(DataConfig(), str(train), "classification", None)
    with pytest.raises(DataError) as exc:
        load_split(DataConfig(), str(dev), "classification", labels)
    msg = str(exc.value)
    assert msg.startswith(f"{dev}:4: unknown label 'neutral'; known labels are ['negative', 'positive']")
    assert "data.labels" in msg and SKIP_HINT in msg
    split, same = load_split(DataConfig(skip_invalid=True), str(dev), "classification", labels)
    assert same is labels and [e.line for e in split.examples] == [1, 2, 3, 5, 6]
    assert dict(split.skipped) == {"unknown label": 1}


def test_label_id_out_of_range_in_dev(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(4))
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    _, labels = load_split(DataConfig(), str(train), "classification", None)
    with pytest.raises(DataError, match=rf"^{re.escape(str(dev))}:2: label id 2 out of range 0..1"):
        load_split(DataConfig(), str(dev), "classification", labels)


# --- file-level errors --------------------------------------------------------------------------------------


def data_error(path, task="classification", **data) -> str:
    with pytest.raises(DataError) as exc:
        load_split(DataConfig(**data), str(path), task, None)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_nonexistent_path(tmp_path):
    p = tmp_path / "nope.jsonl"
    assert data_error(p) == f"{p}: file not found; check data.train/dev/test and data.dir"


def test_relative_path_resolves_against_data_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "t.jsonl", make_rows(4))
    monkeypatch.delenv("SFTLAB_DATA_DIR", raising=False)
    split, _ = load_split(DataConfig(dir=str(tmp_path)), "t.jsonl", "classification", None)
    assert split.source == str(tmp_path / "t.jsonl") and len(split.examples) == 4
    monkeypatch.setenv("SFTLAB_DATA_DIR", str(tmp_path))
    assert load_split(DataConfig(), "t.jsonl", "classification", None)[0].source == str(tmp_path / "t.jsonl")
    assert data_error("missing.jsonl", dir=str(tmp_path)).startswith(f"{tmp_path / 'missing.jsonl'}: file not found")


def test_a_path_found_only_under_the_working_directory_is_read_from_there(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "mine.jsonl", make_rows(3))
    write_jsonl(tmp_path / "data" / "both.jsonl", make_rows(4))
    write_jsonl(tmp_path / "both.jsonl", make_rows(5))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFTLAB_DATA_DIR", str(tmp_path / "data"))
    assert len(load_split(DataConfig(), "mine.jsonl", "classification", None)[0].examples) == 3
    assert len(load_split(DataConfig(), "both.jsonl", "classification", None)[0].examples) == 4  # data dir first
    assert data_error("nowhere.jsonl").startswith(f"{tmp_path / 'data' / 'nowhere.jsonl'}: file not found")


def test_folder_instead_of_file(tmp_path):
    assert data_error(tmp_path) == (
        f"{tmp_path}: is a folder; point data.* at a file (.csv .tsv .jsonl .json .parquet)"
    )


@pytest.mark.parametrize("name", ["d.xlsx", "d", "d.jsonl.gz"])
def test_unknown_extension(tmp_path, name):
    p = tmp_path / name
    p.write_text("text,label\na,b\n")
    msg = data_error(p)
    assert msg.startswith(f"{p}: unknown file type ") and ".csv" in msg and ".jsonl" in msg and ".parquet" in msg


@pytest.mark.parametrize("ext,content", [(".jsonl", b""), (".csv", b""), (".tsv", b"\n\n  \n"), (".json", b"\n")])
def test_empty_file(tmp_path, ext, content):
    p = tmp_path / f"d{ext}"
    p.write_bytes(content)
    assert data_error(p) == f"{p}: file is empty; it needs at least one data row"


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), p)
    assert data_error(p) == f"{p}: file is empty; it needs at least one data row"


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet at all")
    assert data_error(p).startswith(f"{p}: not a readable Parquet file (")


@pytest.mark.parametrize("ext,content", [(".csv", "text,label\n"), (".tsv", "text\tlabel\n\n"), (".json", "[]")])
def test_header_only_file(tmp_path, ext, content):
    p = tmp_path / f"d{ext}"
    p.write_text(content)
    assert data_error(p) == f"{p}: no data rows (only a header?)"


def test_unknown_column_lists_columns(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,label\na,x\nb,y\n")
    assert data_error(csv_path) == f"{csv_path}: no column 'text' (data.text); columns are ['sentence', 'label']"
    js = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": "p"}, {"sentence": "b", "y": "q"}])
    assert data_error(js, text="sentence") == f"{js}: no column 'label' (data.label); columns are ['sentence', 'y']"
    assert data_error(js, text="sentence", label="y", text_pair="s2") == (
        f"{js}: no column 's2' (data.text_pair); columns are ['sentence', 'y']"
    )


def test_index_column_on_jsonl(tmp_path):
    js = write_jsonl(tmp_path / "d.jsonl", make_rows(4))
    assert data_error(js, text=0) == f"{js}: data.text=0 is an index but rows are JSON objects; use a name"


def test_name_column_on_headerless_file(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("a\t0\nb\t1\n")
    assert data_error(p, text="sentence", label=1, header=False) == (
        f"{p}: data.text='sentence' is a name but the file has no header; use an index"
    )


def test_index_past_the_header(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("text\tlabel\na\t0\nb\t1\n")
    assert data_error(p, text=5, label=1, header=True) == f"{p}: data.text=5 but the file has 2 columns"


def test_single_class_training_data(tmp_path):
    js = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": "pos"} for t in "abc"])
    msg = data_error(js)
    assert msg == f"{js}: found 1 distinct label(s) ['pos']; need >= 2"


def test_all_rows_invalid_when_skipping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "", "label": "a"}\n{"text": " ", "label": "b"}\n')
    msg = data_error(p, skip_invalid=True)
    assert msg.startswith(f"{p}: no valid rows left (") and "empty text" in msg


def test_malformed_json_array_names_the_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"text": "a", "label": "x"},\n  {"text": "b", "label": }\n]\n')
    assert data_error(p).startswith(f"{p}:3: malformed JSON (")


def test_json_array_item_not_an_object(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a", "label": "x"}, "oops", {"text": "b", "label": "y"}]))
    assert data_error(p).startswith(f"{p}:2: ")


# --- through the CLI ----------------------------------------------------------------------------------------


def write_config(tmp_path, train, dev=None) -> str:
    p = tmp_path / "check.yaml"
    p.write_text(f"data:\n  train: {train}\n" + (f"  dev: {dev}\n" if dev else ""))
    return str(p)


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("sftlab: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("whitespace_text", "malformed_json_line",
                                                                  "non_numeric_target", "non_utf8_csv")],
                         ids=lambda c: c.name)
def test_data_check_bad_row_is_one_line_exit_2(tmp_path, capsys, tiny_model_dir, case):
    path = write_case(tmp_path, case)
    cfg = write_config(tmp_path, path)
    err = cli_error(capsys, ["data", "check", cfg, f"model.name={tiny_model_dir}", f"task={case.task}"])
    assert err.startswith(f"sftlab: error: {path}:{case.bad_line}: ") and case.reason in err


def test_data_check_bad_dev_label_and_missing_file(tmp_path, capsys, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(8))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_rows(2) + [{"text": "meh", "label": "neutral"}])
    err = cli_error(capsys, ["data", "check", write_config(tmp_path, train, dev), f"model.name={tiny_model_dir}"])
    assert err.startswith(f"sftlab: error: {dev}:3: unknown label 'neutral'")
    err = cli_error(capsys, ["data", "check", write_config(tmp_path, tmp_path / "gone.csv"),
                             f"model.name={tiny_model_dir}"])
    assert "gone.csv: file not found" in err
    err = cli_error(capsys, ["data", "check", write_config(tmp_path, train), "data.txet=x"])
    assert err == "sftlab: error: data.txet: unknown key; did you mean data.text?\n"


def test_data_check_good_data_prints_report(tmp_path, capsys, tiny_model_dir, toy_data):
    cfg = write_config(tmp_path, toy_data["train"], toy_data["dev"])
    assert main(["data", "check", cfg, f"model.name={tiny_model_dir}", "--json"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("train: 64 rows (negative=32, positive=32); tokens p50=")
    assert lines[1].startswith("dev: 32 rows (negative=16, positive=16); tokens p50=")
    assert lines[2] == "labels (id order): ['negative', 'positive']"
    report = json.loads(lines[-1])
    for name, n in (("train", 64), ("dev", 32)):
        r = report[name]
        assert r["rows"] == n and r["skipped"] == {} and r["truncated"] == 0
        assert sum(r["labels"].values()) == n
        t = r["tokens"]
        assert 0 < t["p50"] <= t["p90"] <= t["p99"] <= t["max"] <= 128
        assert f"tokens p50={t['p50']} p90={t['p90']} p99={t['p99']} max={t['max']}" in out
    assert "Traceback" not in err


def test_data_check_reports_skipped_and_truncated(tmp_path, capsys, tiny_model_dir):
    rows = make_rows(10) + [{"text": "", "label": "positive"}, {"text": " ".join(["word"] * 30), "label": "negative"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = write_config(tmp_path, train)
    argv = ["data", "check", cfg, f"model.name={tiny_model_dir}", "data.skip_invalid=true", "data.max_length=16"]
    assert main(argv + ["--json"]) == 0
    out, _ = capsys.readouterr()
    report = json.loads(out.splitlines()[-1])["train"]
    # lengths before truncation (issue 15: they answer "what max_length do I need"): 30 words + [CLS] + [SEP]
    assert report["rows"] == 11 and report["truncated"] == 1 and report["tokens"]["max"] == 32
    assert sum(report["skipped"].values()) == 1
    assert "skipped 1" in out and "truncated 1" in out


def test_data_check_regression_report(tmp_path, capsys, tiny_model_dir):
    p = tmp_path / "sts.csv"
    p.write_text("text,label\na b c,0.5\nd e,4.5\nf,2.5\n")
    assert main(["data", "check", write_config(tmp_path, p), f"model.name={tiny_model_dir}", "task=regression",
                 "--json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["train"]["target"] == {"min": 0.5, "mean": 2.5, "max": 4.5}
    assert "labels (id order)" not in out

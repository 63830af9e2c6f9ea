"""Every file format reads to the same Examples; labels map predictably; batching is a pure, exact partition."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sftlab.config import DataConfig, load_config
from sftlab.data.batches import Encoded, collate, encode, micro_batches, step_batches
from sftlab.data.examples import Example, load_split
from sftlab.data.prepare import prepare

# Text with the characters formats disagree about: commas, double quotes (a lone one too), apostrophes, unicode.
PAIRS = [
    ("A man, a plan, a canal.", 'He said "panama"', "entailment"),
    ('The "best" film', "It's fine", "not_entailment"),
    ('A lone " quote here', "Café, naïve — ok", "entailment"),
    ("plain words", "more plain words", "not_entailment"),
    ("Semi; colon | pipe", "back\\slash", "entailment"),
]
COLUMNS = {"text": "text", "text_pair": "text_pair", "label": "label"}


def as_dicts(rows=PAIRS):
    return [{"text": t, "text_pair": p, "label": y} for t, p, y in rows]


def write(path: Path, rows=PAIRS) -> str:
    """Write rows (text, text_pair, label) in the format of path's extension, with a header where there is one."""
    kind = path.suffix
    if kind == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "text_pair", "label"])
            w.writerows(rows)
    elif kind == ".tsv":
        path.write_text("text\ttext_pair\tlabel\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows),
                        encoding="utf-8")
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in as_dicts(rows)), encoding="utf-8")
    elif kind == ".json":
        path.write_text(json.dumps(as_dicts(rows), indent=2, ensure_ascii=False), encoding="utf-8")
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(as_dicts(rows)), path)
    return str(path)


def load(path, task="classification", labels=None, **data):
    split, label_map = load_split(DataConfig(**data), str(path), task, labels)
    return split, label_map


def triples(split):
    return [(e.text, e.text_pair, e.label) for e in split.examples]


# --- formats ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_format_reads_the_same_examples(tmp_path, ext):
    reference, ref_labels = load(write(tmp_path / "ref.jsonl"), **COLUMNS)
    split, label_map = load(write(tmp_path / f"data{ext}"), **COLUMNS)
    assert triples(split) == triples(reference)
    assert label_map.names == ref_labels.names == ["entailment", "not_entailment"]
    assert [e.text for e in split.examples] == [t for t, _, _ in PAIRS]  # nothing altered, quotes included
    assert split.skipped == {}


def test_csv_quoted_commas_and_line_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",pos\n"say ""hi"", then go",neg\nplain,pos\n', encoding="utf-8")
    split, labels = load(p)
    assert triples(split) == [("hello, world", None, 1), ('say "hi", then go', None, 0), ("plain", None, 1)]
    assert [e.line for e in split.examples] == [2, 3, 4]
    assert labels.names == ["neg", "pos"]


def test_csv_crlf_and_blank_lines(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\r\na,x\r\n\r\nb,y\r\n")
    split, _ = load(p)
    assert [(e.text, e.label, e.line) for e in split.examples] == [("a", 0, 2), ("b", 1, 4)]


def test_tsv_with_header_by_name_and_by_index(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("id\tsentence\tlabel\n1\tgood one\tpos\n2\tbad one\tneg\n", encoding="utf-8")
    by_name, _ = load(p, text="sentence", label="label")
    by_index, _ = load(p, text=1, label=2, header=True)
    assert triples(by_name) == triples(by_index) == [("good one", None, 1), ("bad one", None, 0)]
    assert [e.line for e in by_name.examples] == [2, 3]


def test_headerless_tsv_cola_layout(tmp_path):
    p = tmp_path / "in_domain_train.tsv"
    p.write_text(
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t1\t\tOne more pseudo generalization and I'm giving up.\n"
        "gj04\t0\t*\tThey drank the pub.\n"
        'cj99\t0\t*\tThe more you eat, the "less you want.\n',
        encoding="utf-8",
    )
    split, labels = load(p, text=3, label=1)  # header=auto: no column given by name -> no header row
    assert labels.names == ["0", "1"]
    assert [e.label for e in split.examples] == [1, 1, 0, 0]
    assert [e.line for e in split.examples] == [1, 2, 3, 4]
    assert split.examples[0].text == "Our friends won't buy this analysis, let alone the next one we propose."
    assert split.examples[3].text == 'The more you eat, the "less you want.'


def test_mrpc_layout_with_bom_and_lone_quote(tmp_path):
    p = tmp_path / "msr_paraphrase_train.txt"
    p.write_bytes(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t702876\t702977\tAmrozi accused his brother, whom he called "the witness", of lying.\tHe called him "the '
        "witness.\n"
        "0\t2108705\t2108831\tYucaipa owned Dominick's before selling.\tYucaipa bought Dominick's in 1995.\n".encode()
    )
    split, labels = load(p, text="#1 String", text_pair="#2 String", label="Quality")
    assert labels.names == ["0", "1"]
    assert triples(split) == [
        ('Amrozi accused his brother, whom he called "the witness", of lying.', 'He called him "the witness.', 1),
        ("Yucaipa owned Dominick's before selling.", "Yucaipa bought Dominick's in 1995.", 0),
    ]
    assert [e.line for e in split.examples] == [2, 3]


def test_json_array_and_jsonl_agree_with_extra_keys(tmp_path):
    rows = [{"idx": i, "text": t, "label": y, "meta": {"x": [1]}} for i, (t, _, y) in enumerate(PAIRS)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, _ = load(tmp_path / "a.json")
    b, _ = load(tmp_path / "a.jsonl")
    assert triples(a) == triples(b) == [(t, None, {"entailment": 0, "not_entailment": 1}[y]) for t, _, y in PAIRS]


def test_parquet_with_int_labels_and_column_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"sentence": ["a", "b", "c"], "y": [10, 9, 10]}), p)
    split, labels = load(p, text="sentence", label="y")
    assert labels.names == ["9", "10"]
    assert triples(split) == [("a", None, 1), ("b", None, 0), ("c", None, 1)]


# --- labels -------------------------------------------------------------------------------------------------


def test_label_names_sort_alphabetically(tmp_path):
    p = write(tmp_path / "d.jsonl", [("a", "b", "not_entailment"), ("c", "d", "entailment")])
    split, labels = load(p, **COLUMNS)
    assert labels.names == ["entailment", "not_entailment"]
    assert [e.label for e in split.examples] == [1, 0]


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_int_labels_sort_numerically(tmp_path, ext):
    rows = [(f"t{y}", "p", y) for y in (9, 10, 2, 10, 0)]
    split, labels = load(write(tmp_path / f"d{ext}", rows), **COLUMNS)
    assert labels.names == ["0", "2", "9", "10"]  # 10 after 9, not between 0 and 2
    assert [labels.names[e.label] for e in split.examples] == ["9", "10", "2", "10", "0"]


def test_ids_accepted_where_names_are_given(tmp_path):
    rows = [("a", "x", 0), ("b", "x", "1"), ("c", "x", "positive"), ("d", "x", "negative")]
    split, labels = load_split(DataConfig(**COLUMNS, labels=["negative", "positive"]),
                               write(tmp_path / "d.jsonl", rows), "classification", None)
    assert labels.names == ["negative", "positive"]
    assert [e.label for e in split.examples] == [0, 1, 1, 0]


def test_explicit_label_order_wins(tmp_path):
    rows = [("a", "x", "neg"), ("b", "x", "pos"), ("c", "x", "neu")]
    split, labels = load_split(DataConfig(**COLUMNS, labels=["pos", "neu", "neg"]),
                               write(tmp_path / "d.csv", rows), "classification", None)
    assert labels.names == ["pos", "neu", "neg"]
    assert [e.label for e in split.examples] == [2, 0, 1]


def test_explicit_labels_may_include_classes_absent_from_train(tmp_path):
    rows = [("a", "x", "neg"), ("b", "x", "pos")]
    split, labels = load_split(DataConfig(**COLUMNS, labels=["neg", "neu", "pos"]),
                               write(tmp_path / "d.csv", rows), "classification", None)
    assert [e.label for e in split.examples] == [0, 2]


def test_dev_uses_the_train_label_map(tmp_path):
    train = write(tmp_path / "train.jsonl", [("a", "x", "b_cls"), ("b", "x", "a_cls"), ("c", "x", "c_cls")])
    dev = write(tmp_path / "dev.jsonl", [("d", "x", "c_cls")])  # alone it would be a 1-class map
    cfg = DataConfig(**COLUMNS)
    _, labels = load_split(cfg, train, "classification", None)
    dev_split, dev_labels = load_split(cfg, dev, "classification", labels)
    assert dev_labels is labels and [e.label for e in dev_split.examples] == [2]


def test_regression_targets_are_floats(tmp_path):
    p = tmp_path / "sts.tsv"
    p.write_text("s1\ts2\tscore\na\tb\t0.5\nc\td\t3\ne\tf\t-1.25\ng\th\t4.0e-1\n", encoding="utf-8")
    split, labels = load(p, task="regression", text="s1", text_pair="s2", label="score")
    assert labels is None
    assert [e.label for e in split.examples] == [0.5, 3.0, -1.25, 0.4]
    assert all(type(e.label) is float for e in split.examples)


def test_limit_train_keeps_first_valid_rows_in_file_order(tmp_path, tiny_model_dir):
    from tests.conftest import make_rows, write_jsonl

    rows = make_rows(20)
    rows[1]["text"] = "   "  # a bad row inside the limit does not count towards it
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", make_rows(9, seed=3))
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train}", f"data.dev={dev}",
                             "data.limit_train=5", "data.limit_dev=4", "data.skip_invalid=true"])
    from sftlab.models import load_tokenizer

    data = prepare(cfg, load_tokenizer(str(tiny_model_dir)))
    assert [e.line for e in data.splits["train"].examples] == [1, 3, 4, 5, 6]
    assert [e.text for e in data.splits["train"].examples] == [rows[i]["text"] for i in (0, 2, 3, 4, 5)]
    assert len(data.encoded["train"]) == 5 and len(data.splits["dev"].examples) == len(data.encoded["dev"]) == 4
    report = data.report("classification")
    assert report["train"]["rows"] == 5 and sum(report["train"]["skipped"].values()) == 1


# --- encoding -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from sftlab.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_pair_encoding_has_token_type_ids(tokenizer):
    examples = [Example("the film was great", "i liked it", 1, 1), Example("bad", "awful movie indeed", 0, 2)]
    enc = encode(tokenizer, examples, max_length=64)
    assert enc.token_type_ids is not None and enc.truncated == 0
    for ex, ids, types in zip(examples, enc.input_ids, enc.token_type_ids):
        n_first = len(tokenizer(ex.text)["input_ids"])  # [CLS] text [SEP]
        n_second = len(tokenizer(ex.text_pair, add_special_tokens=False)["input_ids"]) + 1  # pair [SEP]
        assert len(ids) == len(types) == n_first + n_second
        assert types == [0] * n_first + [1] * n_second
    assert enc.labels == [1, 0]


def test_single_sentence_types_are_all_zero(tokenizer):
    enc = encode(tokenizer, [Example("the film was great", None, 1, 1)], max_length=64)
    assert enc.token_type_ids is None or set(enc.token_type_ids[0]) == {0}


def test_truncation_counts_long_examples(tokenizer):
    long = " ".join(["word"] * 40)
    single = encode(tokenizer, [Example(long, None, 0, 1), Example("short", None, 1, 2)], max_length=16)
    assert single.truncated == 1 and single.lengths[0] == 16 and single.lengths[1] < 16
    assert single.input_ids[0][-1] == tokenizer.sep_token_id
    pair = encode(tokenizer, [Example(long, long, 0, 1), Example("short", "x", 1, 2), Example("a", long, 1, 3)], 16)
    assert pair.truncated == 2 and pair.lengths == [16, 5, 16]
    for ids, types in zip(pair.input_ids, pair.token_type_ids):
        assert ids.count(tokenizer.sep_token_id) == 2 and ids[-1] == tokenizer.sep_token_id  # both texts kept
        assert len(types) == len(ids) and types[0] == 0 and types[-1] == 1


# --- step batches -------------------------------------------------------------------------------------------


def lengths_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (n,), generator=g).tolist()


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("n,step", [(1, 4), (7, 4), (64, 8), (203, 4), (1000, 6)])
def test_step_batches_cover_every_index_once(n, step, group):
    lengths = lengths_of(n)
    batches = step_batches(lengths, step, seed=3, epoch=1, group_by_length=group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    sizes = [len(b) for b in batches]
    assert all(0 < s <= step for s in sizes) and sum(s < step for s in sizes) <= 1
    assert len(batches) == -(-n // step)
    if not group:
        assert sizes[:-1] == [step] * (len(sizes) - 1)


@pytest.mark.parametrize("group", [False, True])
def test_step_batches_are_a_pure_function_of_seed_and_epoch(group):
    lengths = lengths_of(500)
    first = step_batches(lengths, 8, seed=1, epoch=0, group_by_length=group)
    torch.manual_seed(1234)
    torch.rand(10)  # global RNG state must not matter
    assert step_batches(lengths, 8, seed=1, epoch=0, group_by_length=group) == first
    assert step_batches(list(lengths), 8, seed=1, epoch=0, group_by_length=group) == first
    assert step_batches(lengths, 8, seed=1, epoch=1, group_by_length=group) != first
    assert step_batches(lengths, 8, seed=2, epoch=0, group_by_length=group) != first


def test_group_by_length_reduces_padding():
    lengths = lengths_of(2000)
    padded = {}
    for group in (False, True):
        batches = step_batches(lengths, 16, seed=0, epoch=0, group_by_length=group)
        padded[group] = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padded[True] < padded[False] / 5


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("accum", [1, 2, 4])
@pytest.mark.parametrize("size", [1, 2, 5, 8, 13, 24])
def test_micro_batches_partition_the_step_batch(world, accum, size):
    lengths = lengths_of(100)
    step = list(range(40, 40 + size))[::-1]
    per_rank = [micro_batches(step, lengths, world, rank, accum) for rank in range(world)]
    flat = [i for rank in per_rank for mb in rank for i in mb]
    assert sorted(flat) == sorted(step)  # every example exactly once across ranks and accumulation
    assert all(len(r) <= accum and all(mb for mb in r) for r in per_rank)
    biggest = -(-size // (world * accum))
    assert all(len(mb) <= biggest for r in per_rank for mb in r)
    # Deterministic: the same call gives the same split.
    assert per_rank == [micro_batches(step, lengths, world, rank, accum) for rank in range(world)]


def test_micro_batches_group_similar_lengths():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    (big, small) = micro_batches(list(range(8)), lengths, world=1, rank=0, accum=2)
    assert min(lengths[i] for i in big) > max(lengths[i] for i in small)


def test_micro_batches_do_not_depend_on_step_order():
    lengths = lengths_of(30)
    step = list(range(30))
    a = micro_batches(step, lengths, 2, 1, 3)
    b = micro_batches(step[::-1], lengths, 2, 1, 3)
    assert [sorted(lengths[i] for i in mb) for mb in a] == [sorted(lengths[i] for i in mb) for mb in b]


# --- collate ------------------------------------------------------------------------------------------------


def toy_encoded(with_types=True, labels=(1, 0, 1, 0)):
    ids = [[101, 5, 6, 102], [101, 7, 102], [101, 8, 9, 10, 11, 102], [101, 102]]
    types = [[0, 0, 0, 0], [0, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0]] if with_types else None
    return Encoded(ids, types, list(labels), 0)


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [1, 3], [3], [2, 0]])
def test_collate_pads_to_the_batch_max(indices):
    data = toy_encoded()
    batch = collate(data, indices, pad_id=0, regression=False)
    width = max(len(data.input_ids[i]) for i in indices)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["input_ids"].shape == (len(indices), width)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        assert batch["input_ids"][row, :n].tolist() == data.input_ids[i]
        assert batch["token_type_ids"][row, :n].tolist() == data.token_type_ids[i]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == 0).all() and (batch["token_type_ids"][row, n:] == 0).all()
    assert batch["labels"].tolist() == [data.labels[i] for i in indices] and batch["labels"].dtype == torch.long


def test_collate_pad_id_regression_and_no_types():
    data = toy_encoded(with_types=False, labels=(0.5, -1.0, 2.25, 3.0))
    batch = collate(data, [2, 3], pad_id=-7, regression=True)
    assert "token_type_ids" not in batch
    assert batch["input_ids"][1].tolist() == [101, 102, -7, -7, -7, -7]
    assert batch["attention_mask"].sum(1).tolist() == [6, 2]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [2.25, 3.0]


def test_collate_without_labels():
    batch = collate(toy_encoded(labels=(None,) * 4), [0, 1], pad_id=0, regression=False)
    assert "labels" not in batch and batch["input_ids"].shape == (2, 4)


@pytest.mark.parametrize("world,accum,budget", [(1, 1, None), (1, 4, None), (2, 2, None), (1, 1, 40), (2, 1, 25)])
def test_paired_micro_batches_partition_both_streams_and_mix_them(world, accum, budget):
    import random

    from sftlab.data.batches import paired_micro_batches

    rng = random.Random(world * 10 + accum)
    lengths = [rng.randint(1, 12) for _ in range(40)]
    a, b = list(range(0, 16)), list(range(16, 40))
    seen = []
    for rank in range(world):
        for m in paired_micro_batches(a, b, lengths, world, rank, accum, budget):
            assert any(i < 16 for i in m) and any(i >= 16 for i in m)  # both streams in every micro-batch
            seen += m
    assert sorted(seen) == list(range(40))

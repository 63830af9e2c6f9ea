"""Config errors name the dotted key and say how to fix it; overrides parse as YAML values."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sftlab.cli import main
from sftlab.config import RunConfig, dump_config, load_config, parse_overrides
from sftlab.errors import ConfigError

TRAIN = "data.train=train.jsonl"


def config_error(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    return str(exc.value)


# --- unknown keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lrr=1e-4", "train.lrr: unknown key; did you mean train.lr?"),
        ("train.batchsize=8", "train.batchsize: unknown key; did you mean train.batch_size?"),
        ("data.skip_invalidd=true", "data.skip_invalidd: unknown key; did you mean data.skip_invalid?"),
        ("trian.lr=1e-4", "trian: unknown key; did you mean train?"),
    ],
)
def test_unknown_key_suggests_the_closest(override, expected):
    assert config_error([TRAIN, override]) == expected


def test_unknown_section_lists_known_keys():
    msg = config_error([TRAIN, "zzz.lr=1"])
    assert msg.startswith("zzz: unknown key; known keys: ")
    assert set(msg.split("known keys: ")[1].split(", ")) == set(RunConfig.model_fields)


def test_unknown_key_without_close_match_lists_the_section():
    msg = config_error([TRAIN, "data.qqqqqq=1"])
    assert msg.startswith("data.qqqqqq: unknown key; known keys: ")
    assert "skip_invalid" in msg and "limit_train" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: t.jsonl\ntrain:\n  lrr: 0.1\n")
    assert config_error([], p) == "train.lrr: unknown key; did you mean train.lr?"


# --- types and literals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key,got",
    [
        ("train.batch_size=abc", "train.batch_size", "'abc'"),
        ("train.lr=fast", "train.lr", "'fast'"),
        ("train.max_steps=[1]", "train.max_steps", "[1]"),
        ("data.skip_invalid=sometimes", "data.skip_invalid", "'sometimes'"),
        ("train=1", "train", "1"),
    ],
)
def test_wrong_type_names_key_and_value(override, key, got):
    msg = config_error([TRAIN, override])
    assert msg.startswith(f"{key}: ") and msg.endswith(f"(got {got})")


def test_wrong_type_on_union_field_names_the_real_key():
    msg = config_error([TRAIN, "data.text=[a]"])
    assert msg.startswith("data.text: ")


@pytest.mark.parametrize(
    "override,key,choices",
    [
        ("task=regresion", "task", ["'classification'", "'regression'"]),
        ("train.schedule=cosin", "train.schedule", ["'linear'", "'cosine'", "'constant'"]),
        ("train.precision=fp16", "train.precision", ["'bf16'", "'fp32'"]),
    ],
)
def test_bad_literal_lists_choices(override, key, choices):
    msg = config_error([TRAIN, override])
    bad = override.split("=", 1)[1]
    assert msg.startswith(f"{key}: ") and msg.endswith(f"(got {bad!r})")
    assert all(c in msg for c in choices)


# --- required keys and impossible combinations --------------------------------------------------------------


def test_missing_data_train():
    msg = config_error([])
    assert "data.train is required" in msg and "data.train=PATH" in msg


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["train.early_stopping_patience=2"], ["train.early_stopping_patience", "data.dev"]),
        (["train.metric=pearson"], ["train.metric", "'pearson'", "classification", "accuracy"]),
        (["task=regression", "train.metric=accuracy"], ["train.metric", "'accuracy'", "regression", "pearson"]),
        (["train.metric=acc"], ["train.metric", "'acc'", "accuracy"]),
        (["task=regression", "data.labels=[a,b]"], ["data.labels", "task: regression", "remove"]),
        (["data.limit_train=0"], ["data.limit_train", ">= 1", "got 0"]),
        (["data.limit_dev=-3"], ["data.limit_dev", ">= 1", "got -3"]),
        (["data.max_length=4"], ["data.max_length", ">= 8"]),
        (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
        (["train.grad_accum=0"], ["train.grad_accum", ">= 1"]),
        (["train.lr=0"], ["train.lr", "> 0"]),
        (["train.warmup_ratio=1"], ["train.warmup_ratio", "[0, 1)"]),
        (["train.epochs=0"], ["train.epochs", "train.max_steps"]),
    ],
)
def test_impossible_combinations(overrides, needles):
    msg = config_error([TRAIN] + overrides)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_valid_combinations_load():
    cfg = load_config(None, [TRAIN, "data.dev=d.jsonl", "train.early_stopping_patience=2", "train.metric=mcc"])
    assert cfg.best_metric == "mcc" and cfg.train.early_stopping_patience == 2
    reg = load_config(None, [TRAIN, "task=regression", "train.metric=spearman"])
    assert reg.best_metric == "spearman"
    assert load_config(None, [TRAIN, "task=regression"]).best_metric == "pearson"
    assert load_config(None, [TRAIN]).best_metric == "accuracy"
    assert load_config(None, [TRAIN, "train.epochs=0", "train.max_steps=5"]).train.max_steps == 5


# --- override parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,value",
    [
        ("1", 1),
        ("-3", -3),
        ("0.5", 0.5),
        ("1.0e-4", 1.0e-4),
        ("true", True),
        ("false", False),
        ("null", None),
        ("~", None),
        ("[1, 2.5, x]", [1, 2.5, "x"]),
        ("[]", []),
        ("hello", "hello"),
        ("", ""),
        ("a=b", "a=b"),  # only the first '=' splits
        ("{x: 1}", {"x": 1}),
    ],
)
def test_override_values_parse_as_yaml(raw, value):
    parsed = parse_overrides([f"a.b={raw}"])
    assert parsed == {"a": {"b": value}}
    assert type(parsed["a"]["b"]) is type(value)


def test_override_exponent_without_dot_is_a_float():
    assert parse_overrides(["train.lr=1e-4"]) == {"train": {"lr": 1e-4}}


def test_override_exponent_reaches_the_config_as_float():
    cfg = load_config(None, [TRAIN, "train.lr=1e-4", "train.weight_decay=0"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)


def test_overrides_nest_and_merge():
    assert parse_overrides(["a.b.c=1", "a.b.d=2", "a.e=3", "f=4"]) == {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}
    assert parse_overrides(["a.b=1", "a.b=2"]) == {"a": {"b": 2}}  # last wins


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"override 'train': expected key=value, e.g. train.lr=1e-4"):
        parse_overrides(["train"])


def test_override_value_then_section_conflict():
    with pytest.raises(ConfigError, match=r"override 'train.lr.x=2': lr is set both as a value and a section"):
        parse_overrides(["train.lr=1", "train.lr.x=2"])


def test_overrides_win_over_yaml_and_keep_siblings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: a.jsonl\n  dev: b.jsonl\ntrain:\n  lr: 0.1\n  batch_size: 4\n")
    cfg = load_config(p, ["train.lr=0.2", "data.train=c.jsonl", "train.betas=[0.8, 0.9]", "data.labels=[x, y]"])
    assert (cfg.train.lr, cfg.train.batch_size) == (0.2, 4)
    assert (cfg.data.train, cfg.data.dev) == ("c.jsonl", "b.jsonl")
    assert cfg.train.betas == (0.8, 0.9) and cfg.data.labels == ["x", "y"]


def test_override_null_clears_a_default():
    cfg = load_config(None, [TRAIN, "train.max_grad_norm=null", "data.text=0", "data.label=1"])
    assert cfg.train.max_grad_norm is None
    assert (cfg.data.text, cfg.data.label) == (0, 1)  # ints select columns by index


def test_override_column_name_with_hash_stays_text():
    # MRPC's columns are named '#1 String' / '#2 String'.
    cfg = load_config(None, [TRAIN, "data.text=#1 String", "data.text_pair=#2 String"])
    assert (cfg.data.text, cfg.data.text_pair) == ("#1 String", "#2 String")


def test_integer_label_names_are_accepted():
    cfg = load_config(None, [TRAIN, "data.labels=[1, 0]"])
    assert cfg.data.labels == ["1", "0"]


# --- YAML files ---------------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    p = tmp_path / "nope.yaml"
    assert config_error([], p) == f"{p}: config file not found"


def test_config_path_is_a_folder(tmp_path):
    assert config_error([], tmp_path) == f"{tmp_path}: config file not found"


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_not_a_mapping(tmp_path, text, kind):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert config_error([], p) == f"{p}: top level must be a mapping of keys, got {kind}"


@pytest.mark.parametrize("text", ["data: [unclosed\n", "a: b: c\n", "data:\n\ttrain: x\n"])
def test_invalid_yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    msg = config_error([], p)
    assert msg.startswith(f"{p}: not valid YAML (") and "\n" not in msg


def test_non_utf8_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"data:\n  train: caf\xe9.jsonl\n")
    assert config_error([], p).startswith(f"{p}: not valid YAML (")


def test_empty_yaml_is_all_defaults_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    cfg = load_config(p, [TRAIN])
    assert cfg.model_dump(exclude={"data", "output_dir"}) == RunConfig(data={"train": "x"}).model_dump(
        exclude={"data", "output_dir"}
    )


# --- output_dir placeholders --------------------------------------------------------------------------------

STAMP = r"\d{8}-\d{6}"


def test_output_dir_name_is_config_stem_and_time(tmp_path):
    p = tmp_path / "sst2-small.yaml"
    p.write_text("data:\n  train: t.jsonl\n")
    assert re.fullmatch(rf"runs/sst2-small-{STAMP}", load_config(p).output_dir)


def test_output_dir_without_config_file_is_named_run():
    assert re.fullmatch(rf"runs/run-{STAMP}", load_config(None, [TRAIN]).output_dir)


def test_output_dir_custom_template_and_literal(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("data:\n  train: t.jsonl\noutput_dir: out/{time}/{name}\n")
    assert re.fullmatch(rf"out/{STAMP}/exp", load_config(p).output_dir)
    assert load_config(p, ["output_dir=plain/dir"]).output_dir == "plain/dir"


@pytest.mark.parametrize("template", ["runs/{nmae}", "runs/{"])
def test_output_dir_bad_placeholder_is_a_config_error(template):
    msg = config_error([TRAIN, f"output_dir={template}"])
    assert "output_dir" in msg and "{name}" in msg


# --- --dry-run ----------------------------------------------------------------------------------------------


def test_dry_run_prints_resolved_yaml_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "exp.yaml"
    p.write_text("data:\n  train: t.jsonl\ntrain:\n  lr: 0.001\n")
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", str(p), "train.batch_size=7", "task=classification", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    dumped = yaml.safe_load(out)
    assert dumped["train"]["batch_size"] == 7 and dumped["train"]["lr"] == 0.001
    assert dumped["data"]["train"] == "t.jsonl" and dumped["model"]["name"] == "minilm-l6"
    assert re.fullmatch(rf"runs/exp-{STAMP}", dumped["output_dir"])
    # The dump is itself a valid config that reloads to the same thing.
    reloaded = load_config(p, ["train.batch_size=7", f"output_dir={dumped['output_dir']}"])
    assert RunConfig.model_validate(dumped) == reloaded
    assert sorted(tmp_path.rglob("*")) == before
    assert err == ""


def test_dry_run_on_bad_config_is_one_line_error(tmp_path, capsys):
    p = tmp_path / "exp.yaml"
    p.write_text("data:\n  train: t.jsonl\n")
    assert main(["train", str(p), "train.lrr=1", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "sftlab: error: train.lrr: unknown key; did you mean train.lr?\n"


def test_dump_config_roundtrips():
    cfg = load_config(None, [TRAIN, "data.labels=[b, a]", "train.betas=[0.8, 0.95]", "output_dir=x"])
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


# --- the shipped configs ------------------------------------------------------------------------------------

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    """Docs point users at these files: a renamed or removed key must not leave one that stops at load."""
    assert load_config(str(path), []).task

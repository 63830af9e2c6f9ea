"""`sftlab data augment --method lm`: rows in the config's columns with provenance, labelled rows first, no
duplicates, the filter keeps only rows its classifier labels as intended, bad input is one line."""
from __future__ import annotations

import json

from sftlab.cli import main
from tests.unit.test_compare import drop_output_dir


def test_writes_deduplicated_rows_with_provenance_and_filters(tiny_overrides, tiny_llama_dir, tmp_path, capsys):
    base = ["data", "augment", "-", *drop_output_dir(tiny_overrides), "data.k_shot=3", "--method", "lm",
            "--model", str(tiny_llama_dir), "--per-example", "3", "--shots", "2", "--about", "review"]
    out = tmp_path / "aug.jsonl"
    assert main(base + ["--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["provenance"]["source"] for r in rows[:6]] == ["labelled"] * 6
    new = rows[6:]
    assert new and all(r["provenance"]["source"] == "lm" and r["provenance"]["generator"] == str(tiny_llama_dir)
                       for r in new)
    texts = [" ".join(r["text"].lower().split()) for r in rows]
    assert len(set(texts)) == len(texts) and all(r["label"] in ("negative", "positive") for r in rows)
    assert main(base + ["--out", str(out)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err

    # the filter: a classifier trained on the same rows; kept rows are those it labels as intended, confidently
    assert main(["train", "-", *drop_output_dir(tiny_overrides), "data.k_shot=3",
                 f"output_dir={tmp_path / 'clf'}"]) == 0
    capsys.readouterr()
    filtered = tmp_path / "filtered.jsonl"
    assert main(base + ["--out", str(filtered), "--filter", str(tmp_path / "clf"), "--min-confidence", "0.5",
                        "--only-new"]) == 0
    kept = [json.loads(x) for x in filtered.read_text().splitlines()]
    assert kept and all(r["provenance"]["source"] == "lm" and r["provenance"]["filter_score"] >= 0.5 for r in kept)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in kept))
    assert main(["predict", str(tmp_path / "clf"), "--data", str(plain), "--out", str(tmp_path / "p.jsonl")]) == 0
    predicted = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["label"] for p in predicted] == [r["label"] for r in kept]


def test_bad_input_is_one_line(tiny_overrides, tiny_llama_dir, tmp_path, capsys):
    base = ["data", "augment", "-", *drop_output_dir(tiny_overrides), "--model", str(tiny_llama_dir),
            "--out", str(tmp_path / "x.jsonl")]
    for extra, msg in [(["--method", "backtranslate"], "--method backtranslate: unknown"),
                       (["--method", "lm", "task=regression"], "needs task classification"),
                       (["--method", "lm", "--min-confidence", "0"], "--min-confidence 0.0"),
                       (["--method", "lm", "--prompt", "poem"], "--prompt poem")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()

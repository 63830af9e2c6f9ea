"""`sftlab` command line: one function per verb. User errors print one line and exit non-zero.

Scripting contract: `train` prints the run directory as its last stdout line; `eval` prints one JSON
object of metrics as its last stdout line. Everything else (progress, reports) goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import SftlabError


def cmd_train(args) -> None:
    from .config import dump_config, load_config
    from .train.loop import train

    cfg = load_config(_config_path(args.config), args.overrides)
    if args.resume:
        cfg.output_dir = args.resume
    if args.dry_run:
        print(dump_config(cfg), end="")
        return
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(run_dir)


def cmd_data_check(args) -> None:
    from .config import load_config
    from .data.prepare import format_report, prepare
    from .models import load_tokenizer

    cfg = load_config(_config_path(args.config), args.overrides)
    data = prepare(cfg, load_tokenizer(cfg.model.name, cfg.model.trust_remote_code))
    report = data.report(cfg.task)
    print(format_report(report))
    if data.labels:
        print(f"labels (id order): {data.labels.names}")
    if args.json:
        print(json.dumps(report))


def cmd_eval(args) -> None:
    from .eval.evaluate import evaluate_file

    scores = evaluate_file(args.run, args.data, batch_size=args.batch_size, bf16=not args.fp32,
                           columns=_columns(args))
    print(json.dumps(scores))


def cmd_predict(args) -> None:
    from .eval.evaluate import predict_file

    out = open(args.out, "x", encoding="utf-8") if args.out else sys.stdout
    try:
        n = 0
        for row in predict_file(args.run, args.data, batch_size=args.batch_size, bf16=not args.fp32,
                                columns=_columns(args)):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        print(f"{n} predictions" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    finally:
        if args.out:
            out.close()


def _config_path(path: str) -> str | None:
    return None if path == "-" else path  # "-": no file, the overrides are the whole config


def _columns(args) -> dict:
    return {"text": _col(args.text), "text_pair": _col(args.text_pair), "label": _col(args.label)}


def _col(v):
    return int(v) if v is not None and v.isdigit() else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning of pretrained language models.")
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="fine-tune as a config says; prints the run directory last")
    t.add_argument("config", help="YAML config (see configs/), or - for overrides only")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    t.add_argument("--dry-run", action="store_true", help="print the resolved, validated config and exit")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    c = dsub.add_parser("check", help="validate every row and report, without training")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--json", action="store_true", help="also print the report as JSON (last line)")
    c.set_defaults(fn=cmd_data_check)

    for name, fn, help_ in (("eval", cmd_eval, "metrics of a run's best model on a labelled file (JSON, last line)"),
                            ("predict", cmd_predict, "predictions with scores as JSONL")):
        e = sub.add_parser(name, help=help_)
        e.add_argument("run", metavar="RUN_DIR", help="a run directory (or its best/ folder)")
        e.add_argument("--data", required=True, help="file to read (columns as in training unless overridden)")
        e.add_argument("--text"), e.add_argument("--text-pair"), e.add_argument("--label")
        e.add_argument("--batch-size", type=int, default=128)
        e.add_argument("--fp32", action="store_true", help="no bf16 autocast")
        if name == "predict":
            e.add_argument("--out", help="write JSONL here (must not exist) instead of stdout")
        e.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except SftlabError as e:
        print(f"sftlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except FileExistsError as e:
        print(f"sftlab: error: {e.filename} exists; choose another --out (nothing was overwritten)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

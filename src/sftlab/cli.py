"""`sftlab` command line: one function per verb. User errors print one line and exit non-zero.

Scripting contract: `train` prints the run directory as its last stdout line; `eval` prints one JSON
object of metrics as its last stdout line. Everything else (progress, reports) goes to stderr.

Past 500 lines on purpose: one short function per verb, read as one table of the CLI; each verb's work lives
in its own module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ConfigError, SftlabError


def cmd_train(args) -> None:
    from . import timing
    from .config import dump_config, load_config
    from .train.loop import train

    timing.mark("verb")
    with timing.phase("config"):
        cfg = load_config(_config_path(args.config), args.overrides)
    if args.resume:
        cfg.output_dir = args.resume
    if args.dry_run:
        print(dump_config(cfg), end="")
        return
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite, graceful_stop=True,
                    force_resume=args.force_resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, one process prints the contract line
        print(run_dir)


def cmd_compare(args) -> None:
    from pathlib import Path

    from .compare import compare, markdown
    from .registry import strategies

    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    if args.strategies == "all":
        names = strategies.names()
    if len(set(names)) != len(names):
        raise SftlabError(f"--strategies {args.strategies}: a strategy is listed twice")
    out = Path(args.out or f"runs/compare-{Path(args.config).stem if args.config != '-' else 'overrides'}")
    rows = compare(_config_path(args.config), names, args.overrides, args.set or [], out, resume=args.resume,
                   workers=_workers(args.workers))
    print(markdown(rows))
    print(f"table: {out / 'compare.md'} and {out / 'compare.json'}; runs under {out}/<strategy>/", file=sys.stderr)
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        raise SftlabError(f"{', '.join(failed)} failed; see the log above and their run directories under {out}")


def cmd_adapt(args) -> None:
    from pathlib import Path

    from .adapt import adapt, table

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2,3,4") from None
    out = Path(args.out or f"runs/adapt-{Path(args.start.rstrip('/')).name}-k{args.k_shot}")
    result = adapt(args.start, args.data, k_shot=args.k_shot, seeds=seeds, dev=args.dev, steps=args.steps,
                   lr=args.lr, overrides=args.overrides, out=out, resume=args.resume, workers=_workers(args.workers))
    print(table(result))
    print(f"runs under {out}/; figures in {out / 'adapt.json'}", file=sys.stderr)
    print(json.dumps({k: result[k] for k in ("metric", "mean", "std", "per_seed")}))


def cmd_sweep(args) -> None:
    from pathlib import Path

    from .sweep import markdown, sweep

    out = Path(args.out or f"runs/sweep-{Path(args.config).stem if args.config != '-' else 'overrides'}")
    mean_over = None if args.mean_over is None else [k for k in args.mean_over.split(",") if k]
    result = sweep(_config_path(args.config), args.over, args.overrides, out, resume=args.resume,
                   workers=_workers(args.workers), mean_over=mean_over, storage=args.storage,
                   study_name=args.study_name, heartbeat=args.heartbeat)
    print(markdown(result["settings"], result["keys"]))
    print(f"table: {out / 'sweep.md'} and {out / 'sweep.json'}; runs under {out}/", file=sys.stderr)
    failed = [r["name"] for r in result["rows"] if "error" in r]
    if failed:
        raise SftlabError(f"{len(failed)} run(s) failed ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''}); "
                          f"see the log above and their run directories under {out}")


def cmd_self_train(args) -> None:
    from pathlib import Path

    from .self_training import self_train

    out = Path(args.out or f"runs/self-train-{Path(args.config).stem if args.config != '-' else 'overrides'}")
    last = self_train(_config_path(args.config), args.overrides, out, args.rounds, args.threshold,
                      max_per_class=args.max_per_class, resume=args.resume, distill=args.distill,
                      round0=Path(args.round_0) if args.round_0 else None)
    print(last)


def cmd_data_augment(args) -> None:
    from pathlib import Path

    from .config import load_config

    cfg = load_config(_config_path(args.config), args.overrides)
    out = Path(args.out)
    if args.method == "lm":
        from .data.lm_augment import lm_augment

        if not args.model:
            raise SftlabError("--method lm needs --model: a decoder (smollm2-135m-instruct, a folder or a causal_lm run)")
        stats = lm_augment(cfg, model=args.model, per_example=args.per_example, out=out, prompt=args.prompt,
                           shots=args.shots, filter_run=args.filter, min_confidence=args.min_confidence,
                           seed=args.seed, batch_size=args.batch_size, about=args.about, only_new=args.only_new)
        print(f"{stats['generated']} generated ({stats['generated_per_s']}/s), {stats['unique']} new and distinct, "
              f"{stats['kept']} kept" + (f" by {args.filter}" if args.filter else "") + f"; {stats['written']} rows "
              f"-> {out}", file=sys.stderr)
    else:
        raise SftlabError(f"--method {args.method}: unknown; use lm (EDA runs at load time: data.augment.name=eda)")
    print(out)


def _workers(n: int) -> int:
    if n < 1:
        raise SftlabError(f"--workers {n}: must be >= 1")
    return n


def cmd_tune(args) -> None:
    from .tune import table, tune

    result = tune(_config_path(args.config), args.overrides, args.trials, space_file=args.space,
                  storage=args.storage, study_name=args.study_name, out=args.out, heartbeat=args.heartbeat)
    print(table(result))
    print(result["best"]["config"])


def cmd_data_check(args) -> None:
    from .config import load_config
    from .data.prepare import format_report, prepare
    from .models import load_tokenizer

    from .models.load import check_model

    cfg = load_config(_config_path(args.config), args.overrides)
    check_model(cfg.model.name, from_scratch=True, max_length=cfg.data.max_length,
                trust_remote_code=cfg.model.trust_remote_code)
    data = prepare(cfg, load_tokenizer(cfg.model.name, cfg.model.trust_remote_code))
    report = data.report(cfg.task)
    print(format_report(report))
    if data.labels:
        print(f"labels (id order): {data.labels.names}")
    if args.json:
        print(json.dumps(report))


def _is_causal(target: str) -> bool:
    """A decoder run (sftlab.json says causal_lm), or a base model name/HF folder evaluated before fine-tuning."""
    from .artifacts import ModelDir

    md = ModelDir.open(target)
    if md.trained:
        return md.task == "causal_lm"
    return (md.path / "config.json").is_file() or not md.path.exists()


def _refuse_starting_point(target: str, verb: str) -> None:
    """A masked-LM or embedding run is a starting point for other runs, not a predictor: one line instead of a
    head mismatch."""
    from .artifacts import ModelDir
    from .errors import RunDirError

    try:
        md = ModelDir.open(target)
        task = md.task if md.trained else None
    except Exception:  # noqa: BLE001  (not a run: the verb itself reports it)
        return
    if task in ("masked_lm", "embedding"):
        what = "a text file (perplexity)" if task == "masked_lm" else "a scored pair file (STS Spearman)"
        raise RunDirError(f"{target}: a {task} run is a starting point, not a model to {verb}; train on it with "
                          f"model.name={target} (classification, regression, distillation), or score it with "
                          f"`sftlab eval RUN --data FILE` on {what}")


def cmd_eval(args) -> None:
    from .eval.evaluate import evaluate_file

    if args.baselines:
        _refuse_starting_point(args.run, "compare with baselines")
        from .eval.baselines import run_baselines

        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        rows = run_baselines(args.run, args.data, batch_size=args.batch_size, bf16=_bf16(args),
                             icl_shots=args.icl_shots or 4, labels_words=labels, limit=args.limit)
        _print_baselines(rows)
        from .eval.baselines import flags

        for line in flags(rows):
            print(f"warning: {line}", file=sys.stderr)
        print(json.dumps(rows))
        return

    from .artifacts import read_export_meta

    export_meta = read_export_meta(args.run)
    if export_meta is not None and export_meta.get("task") != "causal_lm":  # an export folder of any format
        from .export.predict import evaluate_export

        print(json.dumps(evaluate_export(args.run, args.data, batch_size=args.batch_size, columns=_columns(args),
                                         task=args.task)))
        return
    if _is_causal(args.run):
        from .eval.gen_eval import evaluate_generation

        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        scores = evaluate_generation(args.run, args.data, config=args.config, icl_shots=args.icl_shots,
                                     labels=labels, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     limit=args.limit, seed=args.seed, out=args.out, bf16=_bf16(args))
        print(json.dumps(scores))
        return
    scores = evaluate_file(args.run, args.data, batch_size=args.batch_size, bf16=_bf16(args),
                           columns=_columns(args), task=args.task)
    print(json.dumps(scores))


def _bf16(args) -> bool:
    from .precision import resolve

    return resolve("fp32" if args.fp32 else args.precision)


def _print_baselines(rows: dict) -> None:
    keys = [k for k in ("accuracy", "macro_f1", "mcc", "pearson", "spearman", "mse", "label_accuracy",
                        "exact_match", "bleu", "rouge_l", "params", "ms_per_row_batch1", "rows_per_s_batch32",
                        "gen_tokens_per_s") if any(k in r for r in rows.values())]
    print("| model | " + " | ".join(keys) + " |", file=sys.stderr)
    for name, r in rows.items():
        cells = [f"{r[k] / 1e6:.1f}M" if k == "params" and isinstance(r.get(k), int) else
                 f"{r[k]:.4f}" if isinstance(r.get(k), float) else "" for k in keys]
        print(f"| {r.get('name', name)} | " + " | ".join(cells) + " |", file=sys.stderr)


def cmd_predict(args) -> None:
    from .eval.evaluate import predict_file
    from .artifacts import read_export_meta

    _refuse_starting_point(args.run, "predict with")
    if read_export_meta(args.run) is not None:  # an `sftlab export` folder of any format
        from .export.predict import predict_rows

        rows = predict_rows(args.run, args.data, batch_size=args.batch_size, columns=_columns(args), task=args.task)
    else:
        rows = predict_file(args.run, args.data, batch_size=args.batch_size, bf16=_bf16(args),
                            columns=_columns(args), task=args.task)
    if args.out:
        from pathlib import Path

        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SftlabError(f"--out {args.out}: cannot create its folder ({e.strerror})") from None
    out = open(args.out, "x", encoding="utf-8") if args.out else sys.stdout
    ok = False
    try:
        n = 0
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        print(f"{n} predictions" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
        ok = True
    finally:
        if args.out:
            out.close()
            if not ok:  # no half-written --out left behind
                os.unlink(args.out)


def cmd_export(args) -> None:
    from .export import export, format_report

    _refuse_starting_point(args.run, "export")
    report = export(args.run, args.format, args.out, data=args.data, overwrite=args.overwrite, threads=args.threads)
    print(format_report(report), file=sys.stderr)
    print(report["out"])


def cmd_generate(args) -> None:
    from .data.chat import prompt_ids
    from .eval.gen_eval import load_generator
    from .eval.generate import generate

    model, tok, meta = load_generator(args.run)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    prompt = prompt_ids(tok, messages, meta.get("template"))
    out = generate(model, tok, [prompt] * args.n, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   stop=[tok.eos_token] if tok.eos_token else None)
    for text in out:
        print(text)


def cmd_chat(args) -> None:
    from .data.chat import prompt_ids
    from .eval.gen_eval import load_generator
    from .eval.generate import generate

    model, tok, meta = load_generator(args.run)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tok, [prompt_ids(tok, history, meta.get("template"))],
                         max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, stop=[tok.eos_token] if tok.eos_token else None)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)


def cmd_serve(args) -> None:
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. A server shares its cores with the
    # HTTP event loop (and often other work); spinning threads then stall the one doing the work (measured on a
    # busy 2-core machine, 2 threads: 57-144 ms per text spinning, 9-11 ms passive). The environment's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .serve.server import serve
    from .serve.settings import make_settings

    settings = make_settings(host=args.host, port=args.port, token=args.token, max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
                             max_texts=args.max_texts, max_chars=args.max_chars, max_new_tokens=args.max_new_tokens,
                             max_queue_generate=args.max_queue_generate,
                             max_body_bytes=args.max_body_bytes, threads=args.threads, precision=args.precision,
                             max_connections=args.max_connections, max_header_bytes=args.max_header_bytes,
                             header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s)
    _refuse_starting_point(args.dir, "serve")
    serve(args.dir, settings)


def cmd_env(args) -> None:
    """What a bug report needs: versions, threads, bf16, packaged models, cache paths (JSON with --json)."""
    import importlib.metadata as md
    import platform

    import torch

    from . import __version__
    from .models.load import PACKAGED
    from .models.packaged import PACKAGED_DECODERS, cache_root
    from .precision import bf16_faster

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    from .models.zipped import PACKAGED_ZIPS

    packaged = {name: version(pip) is not None for name, (_, _, pip) in {**PACKAGED, **PACKAGED_DECODERS}.items()}
    packaged |= {name: all(version(p) is not None for p in pkgs) for name, (pkgs, _) in PACKAGED_ZIPS.items()}
    info = {
        "sftlab": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "packages": {p: version(p) for p in ("torch", "transformers", "peft", "accelerate", "tokenizers",
                                             "safetensors", "optuna", "fastapi", "uvicorn", "onnxruntime")},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(), "bf16_faster_than_fp32": bf16_faster("cuda" if torch.cuda.is_available()
                                                                               else "cpu"),
        "packaged_models_installed": packaged, "cache": str(cache_root()),
        "data_dir": os.environ.get("SFTLAB_DATA_DIR"), "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
    }
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v if v not in (None, True, False) else {None: '-', True: 'yes', False: 'no'}[v]}"
                              for k, v in value.items())
        print(f"{key}: {value}")


def cmd_report(args) -> None:
    from .report import build_report

    path = build_report(args.runs, out=args.out, overwrite=args.overwrite, evaluate=not args.no_eval)
    print(path)


def _config_path(path: str) -> str | None:
    return None if path == "-" else path  # "-": no file, the overrides are the whole config


def _columns(args) -> dict:
    return {"text": _col(args.text), "text_pair": _col(args.text_pair), "label": _col(args.label)}


def _col(v):
    return int(v) if v is not None and v.isdigit() else v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning of pretrained language models.")
    p.add_argument("--version", action="version", version=f"sftlab {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)
    n = sub.add_parser("env", help="versions, threads, bf16 support, packaged models installed, cache paths")
    n.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    n.set_defaults(fn=cmd_env)

    t = sub.add_parser("train", help="fine-tune as a config says; prints the run directory last")
    t.add_argument("config", help="YAML config (see configs/), or - for overrides only")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--force-resume", action="store_true", help="resume even if the config names another task, "
                                                               "model, data files or label set than the run's")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    t.add_argument("--dry-run", action="store_true", help="print the resolved, validated config and exit")
    t.set_defaults(fn=cmd_train)

    m = sub.add_parser("compare", help="train several strategies on the same data and seed; prints one table")
    m.add_argument("config", help="YAML config, or - for overrides only")
    m.add_argument("overrides", nargs="*", help="key.sub=value overrides for every strategy")
    m.add_argument("--strategies", required=True, help="comma-separated strategy names (or all)")
    m.add_argument("--set", action="append", metavar="STRATEGY:KEY=VALUE",
                   help="an override for one strategy only, e.g. --set lora:train.lr=5e-4 (repeatable)")
    m.add_argument("--out", help="folder for the runs and the table (default runs/compare-<config>)")
    m.add_argument("--resume", action="store_true", help="reuse finished strategies in --out, resume the others")
    m.add_argument("--workers", type=int, default=1, help="runs at a time (the cores are shared between them)")
    m.set_defaults(fn=cmd_compare)

    w = sub.add_parser("sweep", help="train every combination of --over values (e.g. k-shot sizes x seeds); prints "
                                     "a table of mean ± std per setting")
    w.add_argument("config", help="YAML config, or - for overrides only")
    w.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    w.add_argument("--over", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a key and its values (repeatable; every combination runs)")
    w.add_argument("--mean-over", metavar="KEYS", help="comma-separated --over keys averaged over (default: the keys "
                                                       "ending in seed, e.g. data.k_shot_seed, train.seed)")
    w.add_argument("--out", help="folder for the runs and the table (default runs/sweep-<config>)")
    w.add_argument("--resume", action="store_true", help="reuse finished runs in --out, resume the others")
    w.add_argument("--workers", type=int, default=1, help="runs at a time (the cores are shared between them)")
    w.add_argument("--storage", metavar="URL", help="share the grid between worker commands on any machines: "
                   "postgresql://USER@HOST/DB, sqlite:///PATH or journal:PATH (--out on a shared filesystem)")
    w.add_argument("--study-name", help="the grid's study in --storage (default: the --out folder's name)")
    w.add_argument("--heartbeat", type=int, default=20, metavar="S", help="with --storage: seconds between a "
                   "running combination's heartbeats; after 3x this a killed worker's run is retried (default 20)")
    w.set_defaults(fn=cmd_sweep)

    ad = sub.add_parser("adapt", help="fine-tune a start (run dir or model) on K labels per class of a new task, "
                                      "per seed; prints mean ± std and one JSON line last")
    ad.add_argument("start", help="RUN_DIR (its best/), a model folder or a packaged model name")
    ad.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. data.text=sentence, "
                                                 "model.head_from=NAME for a multitask start)")
    ad.add_argument("--data", required=True, help="labelled file of the new task; the K-shot samples come from it")
    ad.add_argument("--dev", help="file scored at the end (default: the rows of --data outside the sample)")
    ad.add_argument("--k-shot", type=int, required=True, help="labelled rows per class")
    ad.add_argument("--seeds", default="0,1,2,3,4", help="k-shot sample seeds (default 0,1,2,3,4)")
    ad.add_argument("--steps", type=int, default=50, help="fine-tuning steps per seed (default 50)")
    ad.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    ad.add_argument("--out", help="folder for the runs (default runs/adapt-<start>-k<K>)")
    ad.add_argument("--resume", action="store_true", help="reuse finished seeds in --out, resume the others")
    ad.add_argument("--workers", type=int, default=1, help="runs at a time (the cores are shared between them)")
    ad.set_defaults(fn=cmd_adapt)

    st = sub.add_parser("self-train", help="self-training on data.unlabelled: round 0 on the labels, each next round "
                                           "adds confident pseudo-labels; prints the last run directory last")
    st.add_argument("config", help="YAML config with data.unlabelled, or - for overrides only")
    st.add_argument("overrides", nargs="*", help="key.sub=value overrides for every round")
    st.add_argument("--rounds", type=int, required=True, help="pseudo-labelling rounds after round 0 (e.g. 3)")
    st.add_argument("--threshold", type=float, default=0.9,
                    help="keep rows the previous round labels with probability >= this (default 0.9; 1.0 adds none)")
    st.add_argument("--max-per-class", type=int, help="at most this many pseudo-labelled rows per class and round")
    st.add_argument("--distill", action="store_true", help="finally distil the last round into a fresh model on the "
                                                           "labels + unlabelled text (OUT/distill)")
    st.add_argument("--round-0", metavar="RUN_DIR", help="a finished run on the same labels to use as round 0 (e.g. "
                                                        "an objective mmd run: it labels the target text)")
    st.add_argument("--out", help="folder for the rounds (default runs/self-train-<config>)")
    st.add_argument("--resume", action="store_true", help="reuse finished rounds in --out, resume the others")
    st.set_defaults(fn=cmd_self_train)

    u = sub.add_parser("tune", help="hyper-parameter search (Optuna); prints the best config's YAML path last")
    u.add_argument("config", help="YAML config with a search: section (or give --space), or - for overrides only")
    u.add_argument("overrides", nargs="*", help="key.sub=value overrides for every trial")
    u.add_argument("--trials", type=int, required=True, help="finished trials wanted in the study (resumes count)")
    u.add_argument("--space", metavar="FILE", help="YAML holding the search section (replaces the config's)")
    u.add_argument("--storage", metavar="URL", help="sqlite:///PATH (default OUT/study.db), postgresql://USER@HOST/DB "
                                                    "or journal:PATH: the study its workers share (docs/distributed.md)")
    u.add_argument("--study-name", help="study name in the storage (default: the config's stem)")
    u.add_argument("--heartbeat", type=int, default=20, metavar="S", help="seconds between a running trial's "
                   "heartbeats; after 3x this a killed worker's trial is marked failed and retried (default 20)")
    u.add_argument("--out", help="folder for trial-N runs, best.yaml, results.json (default runs/tune-<config>)")
    u.set_defaults(fn=cmd_tune)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    a = dsub.add_parser("augment", help="write new labelled rows made by a decoder (--method lm), filtered and "
                                        "with provenance; prints the file last")
    a.add_argument("config", help="the classification config whose labelled rows (after data.k_shot) are augmented")
    a.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    a.add_argument("--method", required=True, help="lm: label-conditioned generation by a decoder")
    a.add_argument("--model", help="the decoder: smollm2-135m-instruct, a model folder, or a causal_lm run")
    a.add_argument("--per-example", type=int, default=4, help="generations per labelled row (default 4)")
    a.add_argument("--out", required=True, help="JSONL file to write (never overwritten)")
    a.add_argument("--prompt", default="paraphrase", help="paraphrase (rewrite each row) or generate (new text of "
                                                          "the row's class)")
    a.add_argument("--shots", type=int, default=4, help="rows of the same class shown in each prompt (default 4)")
    a.add_argument("--filter", metavar="RUN_DIR", help="a classifier trained on the same labelled rows: keep only "
                                                       "rows it labels as intended")
    a.add_argument("--min-confidence", type=float, default=0.9, help="with --filter: its probability for the "
                                                                     "intended class at least this (default 0.9)")
    a.add_argument("--about", default="text", help="what a row is, in the prompt (e.g. 'movie review')")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    a.add_argument("--only-new", action="store_true", help="leave the labelled rows out of --out")
    a.set_defaults(fn=cmd_data_augment)
    c = dsub.add_parser("check", help="validate every row and report, without training")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--json", action="store_true", help="also print the report as JSON (last line)")
    c.set_defaults(fn=cmd_data_check)

    for name, fn, help_ in (("eval", cmd_eval, "metrics of a run's best model on a labelled file (JSON, last line)"),
                            ("predict", cmd_predict, "predictions with scores as JSONL")):
        e = sub.add_parser(name, help=help_)
        e.add_argument("run", metavar="RUN_DIR", help="a run directory (or its best/ folder), or an `sftlab export` "
                                                      "folder")
        e.add_argument("--data", required=True, help="file to read (columns as in training unless overridden)")
        e.add_argument("--text"), e.add_argument("--text-pair"), e.add_argument("--label")
        e.add_argument("--task", help="a multitask model: the task (head) to use, with its columns and labels")
        e.add_argument("--batch-size", type=int, default=128)
        e.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto" if name == "eval" else "fp32",
                       help=("auto (default): bf16 autocast where this machine's bf16 matmuls are faster, else fp32"
                             if name == "eval" else "fp32 (default: scores as trained, no bf16 rounding); bf16 or "
                             "auto trade score precision for speed") + " (export folders always run as exported)")
        e.add_argument("--fp32", action="store_true", help="same as --precision fp32")
        if name == "eval":  # decoders: generation-based evaluation
            e.add_argument("--baselines", action="store_true",
                           help="also majority class, the from-scratch twin (trained if missing), and for decoders "
                                "zero-shot and K-shot ICL; saved to RUN_DIR/baselines.json")
            e.add_argument("--config", help="decoders: config giving the data layout (default: the run's own)")
            e.add_argument("--icl-shots", type=int, default=0, help="decoders: K in-context examples from data.train")
            e.add_argument("--labels", help="decoders: comma-separated label words scored as accuracy")
            e.add_argument("--max-new-tokens", type=int, default=64)
            e.add_argument("--limit", type=int, help="decoders: evaluate the first N rows only")
            e.add_argument("--seed", type=int, default=0)
            e.add_argument("--out", help="decoders: per-example outputs as JSONL (must not exist)")
        if name == "predict":
            e.add_argument("--out", help="write JSONL here (must not exist) instead of stdout")
        e.set_defaults(fn=fn)
    for name, fn, help_ in (("generate", cmd_generate, "generate a reply to --prompt with a decoder"),
                            ("chat", cmd_chat, "interactive chat with a decoder")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("run", metavar="RUN_DIR", help="a causal_lm run directory, or a model name or folder")
        if name == "generate":
            g.add_argument("--prompt", required=True)
            g.add_argument("-n", type=int, default=1, help="number of replies")
        g.add_argument("--system", help="system message")
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        g.add_argument("--temperature", type=float, default=0.7)
        g.add_argument("--top-p", type=float, default=0.9)
        g.add_argument("--seed", type=int, default=0)
        g.set_defaults(fn=fn)

    x = sub.add_parser("export", help="a run's best model as a folder transformers/peft/onnxruntime load; prints "
                                      "the folder last (docs/export.md)")
    x.add_argument("run", metavar="RUN_DIR", help="a run directory (or its best/ folder)")
    x.add_argument("--format", required=True, metavar="FORMAT",
                   help="hf | merged | peft | int8 | onnx (int8 and onnx also report size, latency, dev metrics)")
    x.add_argument("--out", help="folder to write (must be empty or new unless --overwrite); default "
                                 "RUN_DIR/export/FORMAT")
    x.add_argument("--data", metavar="FILE", help="labelled file for the int8/onnx metric figures and parity inputs "
                                                   "(default: the run's dev set, when it resolves)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (swapped in when complete)")
    x.add_argument("--threads", type=int, help="torch and onnxruntime threads for the latency figures (default: "
                                               "torch's, i.e. the cores)")
    x.set_defaults(fn=cmd_export)

    r = sub.add_parser("report", help="one self-contained HTML report of one or more runs; prints its path last")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, shown side by side")
    r.add_argument("--out", help="HTML file to write (must not exist unless --overwrite); default "
                                 "RUN_DIR/report.html for one run, runs/report-<time>.html for several")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    r.add_argument("--no-eval", action="store_true",
                   help="show only what is on disk: no error analysis of the dev set with the best model")
    r.set_defaults(fn=cmd_report)

    v = sub.add_parser("serve", help="HTTP API (classify, generate, OpenAI chat completions) for an export folder or "
                                     "a run directory; prints the URL on stderr when ready")
    v.add_argument("dir", metavar="DIR", help="an `sftlab export` folder (sftlab_export.json) or a run directory")
    v.add_argument("--host", help="interface to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, help="TCP port (default 8000; 0 = any free port)")
    v.add_argument("--token", help="bearer token required on every route but /health (default: env "
                                   "SFTLAB_SERVE_TOKEN; none = open)")
    v.add_argument("--max-batch-size", type=int, help="most texts per micro-batch (default 64)")
    v.add_argument("--max-wait-ms", type=float, help="longest a text waits for a batch to fill (default 5)")
    v.add_argument("--max-queue", type=int, help="texts waiting before requests get 429 (default 2048)")
    v.add_argument("--max-queue-generate", type=int, help="generation requests queued or running before 429 "
                                                          "(default 8; they run one at a time)")
    v.add_argument("--timeout-s", type=float, help="per-request time limit; over it 504 (default 30)")
    v.add_argument("--max-texts", type=int, help="texts per /v1/classify request (default 256)")
    v.add_argument("--max-chars", type=int, help="characters per text, prompt or message (default 20000)")
    v.add_argument("--max-new-tokens", type=int, help="largest max_new_tokens a request may ask (default 1024)")
    v.add_argument("--max-body-bytes", type=int, help="request body size limit (default 4 MiB)")
    v.add_argument("--max-connections", type=int, help="open connections at once; more get 503 (default 256)")
    v.add_argument("--max-header-bytes", type=int, help="request line + headers; more get 431 (default 32768)")
    v.add_argument("--header-timeout-s", type=float, help="time to send the headers; over it 408 (default 10)")
    v.add_argument("--body-timeout-s", type=float, help="time to send the body; over it 408 (default 10)")
    v.add_argument("--threads", type=int, help="torch threads for inference (default: all cores)")
    v.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="classification passes: auto (default) = bf16 where this machine's bf16 matmuls are measured "
                        "faster, else fp32; "
                        "fp32 = answers equal offline fp32 predictions to 1e-5")
    v.set_defaults(fn=cmd_serve)
    return p


def entry() -> None:
    """The `sftlab` console script and `python -m sftlab`: training verbs re-execute under jemalloc where available
    (allocator.py), then the verb runs and the process leaves without the interpreter's teardown (leave())."""
    from .allocator import reexec_under_jemalloc

    reexec_under_jemalloc(sys.argv[1:])  # the process may be replaced here
    from .timing import mark

    mark("main")  # summary.json's timing.startup ends here (interpreter start and any re-exec before it)
    leave(main())


def leave(code: int) -> None:
    """Exit without tearing down the interpreter's modules: once torch and transformers are imported, that teardown
    alone costs ~1 s after the work is done (issue 22: 1.04-1.28 s measured on a 2-core EPYC, the same after a bare
    `import torch, transformers`). Non-daemon threads are joined, exit handlers run and the streams are flushed
    first, so nothing written is lost; SFTLAB_CLEAN_EXIT=1 keeps the full teardown (profilers, leak checkers)."""
    if os.environ.get("SFTLAB_CLEAN_EXIT") or "torch" not in sys.modules:
        sys.exit(code)
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # (private, but the one way to run them: logging's shutdown, tensorboard, torch's own)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`compare cfg --strategies a,b train.lr=1e-3`): argparse
    # ends a nargs="*" positional at the first option, so collect the rest here.
    strays = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = list(args.overrides) + extra
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

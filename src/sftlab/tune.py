"""`sftlab tune`: hyper-parameter search with Optuna (TPE sampler, median pruning on the dev metric).

The search space lives in the config under a top-level `search:` key (or in `--space FILE`); it is removed
before the rest validates as a RunConfig. Trial k trains into OUT/trial-k; the study is stored in an Optuna
RDB URL (default sqlite:///OUT/study.db), so re-running the same command resumes it and several workers may
share it. At the end: OUT/results.json and OUT/best.yaml (the best trial's complete config). docs/tune.md.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path


from .config import RunConfig, build_config, drop_foreign_options, dump_config, parse_overrides, read_yaml
from .errors import ConfigError, SftlabError
from .eval.metrics import LOWER_IS_BETTER

RANGE_FIELDS, MAX_FAILS_IN_ROW, POLL_S = {"low", "high", "log", "step"}, 3, 5.0


class _TrialFailed(Exception):
    """A trial's own failure (user error, divergence, out of memory): recorded as FAIL, the study goes on."""


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _with(raw: dict, values: dict) -> dict:
    """raw with dotted keys set: {"train.lr": 1e-4} -> raw["train"]["lr"] = 1e-4."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"search.space.{key}: {p} is a value, not a section")
        node[leaf] = value
    return out


def default_space(raw: dict) -> dict:
    """The space searched when the config has none: learning rate (log-uniform), batch size, warmup and weight
    decay, as the HF Trainer's default Optuna space does (lr 1e-6..1e-4 log, epochs, seed, batch size); here lr
    spans 1e-5..1e-3 (LoRA and small models want more than full fine-tuning of a base model), and LoRA/DoRA also
    search r and alpha. Epochs stay the config's: the pruner compares trials evaluation by evaluation."""
    space = {"train.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
             "train.batch_size": {"choices": [8, 16, 32]},
             "train.warmup_ratio": {"choices": [0.0, 0.06, 0.1]},
             "train.weight_decay": {"choices": [0.0, 0.01, 0.1]}}
    if isinstance(raw.get("train"), dict) and raw["train"].get("warmup_steps") is not None:
        space["train.warmup_steps"] = space.pop("train.warmup_ratio") | {"choices": [0, 50, 100]}
    strategy = (raw.get("strategy") or {}).get("name") if isinstance(raw.get("strategy"), dict) else None
    if strategy in ("lora", "dora"):
        space |= {"strategy.r": {"choices": [4, 8, 16, 32]}, "strategy.alpha": {"choices": [8, 16, 32, 64]}}
    return space


def check_space(search, raw: dict) -> dict:
    """Validate the `search:` section against the base config; returns {metric, direction, space}."""
    if not isinstance(search, dict):
        raise ConfigError("search: must be a mapping with metric, direction and space")
    extra = set(search) - {"metric", "direction", "space"}
    if extra:
        raise ConfigError(f"search.{sorted(extra)[0]}: unknown key; known keys: metric, direction, space")
    space = search.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("search.space is empty: add at least one key, e.g. "
                          "train.lr: {low: 1.0e-5, high: 5.0e-4, log: true}")
    base = build_config(raw)
    if search.get("metric") is not None:
        try:
            base = build_config(_with(raw, {"train.metric": search["metric"]}))
        except ConfigError as e:
            raise ConfigError(f"search.metric: {e}") from None
    metric = base.best_metric
    want = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    direction = search.get("direction", want)
    if direction != want:
        raise ConfigError(f"search.direction: {direction!r} does not fit metric {metric} (training keeps the "
                          f"checkpoint that {want}s it); remove search.direction or set it to {want}")
    if base.data.dev is None and not (base.tasks and any(e.dev for e in base.tasks.values())):
        raise ConfigError("sftlab tune scores trials on dev data: set data.dev (task multitask: tasks.NAME.dev)")
    for key, spec in space.items():
        where = f"search.space.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
        if "choices" in spec:
            if set(spec) != {"choices"}:
                raise ConfigError(f"{where}: choices cannot be combined with {sorted(set(spec) - {'choices'})}")
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices or any(
                    not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
                raise ConfigError(f"{where}.choices: expected a non-empty list of numbers, strings or booleans")
            samples = choices
        else:
            unknown = set(spec) - RANGE_FIELDS
            if unknown or not {"low", "high"} <= set(spec):
                bad = f"unknown field {sorted(unknown)[0]!r}" if unknown else "low and high are required"
                raise ConfigError(f"{where}: {bad}; use {{low, high}} (optionally log: true or step) or {{choices}}")
            low, high, step = spec["low"], spec["high"], spec.get("step")
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in (low, high)):
                raise ConfigError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
            if low >= high:
                raise ConfigError(f"{where}: low ({low}) must be < high ({high})")
            if spec.get("log") and low <= 0:
                raise ConfigError(f"{where}: log: true needs low > 0, got {low}")
            if spec.get("log") and step is not None:
                raise ConfigError(f"{where}: use log: true or step, not both")
            if step is not None and (not isinstance(step, (int, float)) or step <= 0):
                raise ConfigError(f"{where}: step must be a number > 0, got {step!r}")
            samples = [low, high]
        for value in samples:  # every value the sampler may pick must give a valid config
            try:
                build_config(_with(raw, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    return {"metric": metric, "direction": direction, "space": space}


def _suggest(trial, key: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
        return trial.suggest_int(key, low, high, step=step or 1, log=log)
    return trial.suggest_float(key, float(low), float(high), step=step, log=log)


def _open_study(storage: str, name: str, direction: str, seed: int, space: dict, heartbeat: int = 20):
    import optuna

    from .search_storage import open_study

    study = open_study(storage, name, direction, heartbeat,
                       pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in {storage} {study.direction.name.lower()}s, but this search "
                          f"{direction}s; use another --study-name")
    saved = study.user_attrs.get("sftlab_space")
    if saved is None:
        study.set_user_attr("sftlab_space", space)
    elif saved != json.loads(json.dumps(space)):
        raise ConfigError(f"study {name!r} in {storage} was run with another search space; keep the space, "
                          "or use another --study-name or --out")
    return study, (lambda n_trials: optuna.samplers.TPESampler(seed=seed + n_trials, n_startup_trials=5,
                                                                constant_liar=True))


def tune(config: str | None, overrides: list[str], n_trials: int, *, space_file: str | None = None,
         storage: str | None = None, study_name: str | None = None, out: str | None = None,
         heartbeat: int = 20) -> dict:
    """Run trials until the study holds n_trials finished (complete or pruned) ones; returns results.json."""
    import optuna
    from optuna.trial import TrialState

    from .search_storage import fail_stale, run_one_trial

    if n_trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {n_trials}")
    raw = read_yaml(config, "config") if config else {}
    search = raw.pop("search", None)
    if space_file:
        search = read_yaml(space_file, "--space")
        search = search["search"] if set(search) == {"search"} else search
    extra = parse_overrides(overrides)
    if search is None:  # as the HF Trainer's hyperparameter_search: a documented default space
        search = {"space": default_space(_merge(raw, extra))}
        print(f"no search: section; searching the default space ({', '.join(search['space'])}; docs/tune.md)",
              file=sys.stderr)
    if "search" in extra:
        raise ConfigError("search.* cannot be set by overrides; edit the search: section or pass --space FILE")
    raw = _merge(raw, extra)
    spec = check_space(search, raw)
    metric, space = spec["metric"], spec["space"]
    stem = Path(config).stem if config else "overrides"
    out_dir = Path(out or f"runs/tune-{stem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out_dir.resolve() / 'study.db'}"
    study_name = study_name or stem
    existing = [p for p in out_dir.glob("trial-*") if p.is_dir()]  # listed before the study is read: no race
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own one line per trial instead
    study, sampler = _open_study(storage, study_name, spec["direction"], build_config(raw).train.seed, space,
                                 heartbeat)
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    strangers = sorted(p.name for p in existing if p.name.removeprefix("trial-") not in map(str, numbers))
    if strangers:
        raise ConfigError(f"--out {out_dir}: {strangers[0]} belongs to no trial of study {study_name!r} in "
                          f"{storage}; choose another --out (or the study it came from)")

    if not study.get_trials(deepcopy=False):
        _enqueue_default(study, build_config(raw), space)

    def objective(trial) -> float:
        before = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                          TrialState.RUNNING, TrialState.WAITING))
        current["number"] = trial.number
        if sum(t.number < trial.number for t in before) >= n_trials:  # another worker filled the budget first
            trial.set_user_attr("error", "not needed: the other workers reached --trials")
            raise _TrialFailed("surplus")
        params = {key: _suggest(trial, key, s) for key, s in space.items()}
        run_dir = out_dir / f"trial-{trial.number}"
        print(f"trial {trial.number}: {_fmt_params(params)} -> {run_dir}", file=sys.stderr, flush=True)
        evals, state = [], {}

        def on_eval(step: int, scores: dict) -> bool:
            evals.append(step)
            value = scores.get(metric, math.nan)
            if not (math.isfinite(value) and math.isfinite(scores.get("loss", 0.0))):
                state["diverged"] = f"diverged: dev {metric}={value}, loss={scores.get('loss')} at step {step}"
                return True
            trial.report(value, len(evals))  # the k-th evaluation: comparable across batch sizes when per epoch
            state["pruned"] = bool(trial.should_prune())
            return state["pruned"]

        try:
            from .train.loop import train

            cfg = build_config(drop_foreign_options(_with(raw, {**params, "train.metric": metric,
                                                                "train.progress": False, "output_dir": str(run_dir)})))
            train(cfg, on_eval=on_eval)
        except SftlabError as e:
            _fail(trial, str(e))
        except RuntimeError as e:  # CUDA out of memory: a too-large batch fails its trial, not the study
            if "out of memory" not in str(e):
                raise
            _fail(trial, f"out of memory: {str(e).splitlines()[0]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only for resuming; a trial never resumes
        trial.set_user_attr("train_seconds", summary["train_seconds"])
        trial.set_user_attr("dev_metrics", summary.get("dev_metrics"))
        if "diverged" in state:
            _fail(trial, state["diverged"])
        if state.get("pruned"):
            print(f"trial {trial.number}: pruned after evaluation {len(evals)} (step {evals[-1]})",
                  file=sys.stderr, flush=True)
            raise optuna.TrialPruned()
        value = (summary.get("dev_metrics") or {}).get(metric)
        if value is None or not math.isfinite(value):
            _fail(trial, f"no finite dev {metric} in {run_dir}/summary.json")
        print(f"trial {trial.number}: dev {metric}={value:.4f} in {summary['train_seconds']:.0f}s",
              file=sys.stderr, flush=True)
        return value

    fails, current, waiting, stop = 0, {}, False, None
    try:
        while True:
            fail_stale(study)  # trials of killed workers (no heartbeat for 3 x --heartbeat s): failed, retried
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            if done >= n_trials:
                break
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if done + running >= n_trials:  # the remaining trials run in other workers; one may still fail
                if not waiting:
                    print(f"waiting for {running} trial(s) running in other workers", file=sys.stderr, flush=True)
                waiting = True
                time.sleep(POLL_S)
                continue
            waiting = False
            study.sampler = sampler(len(trials))  # seeded per position: resuming does not repeat samples
            _free_memory()
            if not run_one_trial(study, objective, (_TrialFailed,), heartbeat, lambda: current.get("number")):
                continue
            mine = study.get_trials(deepcopy=False)[current["number"]]
            if mine.user_attrs.get("error", "").startswith("not needed"):
                continue
            fails = fails + 1 if mine.state == TrialState.FAIL else 0
            if fails >= MAX_FAILS_IN_ROW:
                stop = (f"{fails} trials in a row failed, the last with: {mine.user_attrs.get('error')}; "
                        "fix the config and re-run the same command to resume the study")
                break
    except KeyboardInterrupt:
        print(f"tune: interrupted; the study is saved in {storage}; re-run the same command to resume",
              file=sys.stderr)
        raise
    result = _finish(study, raw, spec, out_dir, stem, storage)
    if stop:
        raise SftlabError(stop)
    if result["best"] is None:
        states = [r["state"] for r in result["trials"]]
        raise SftlabError(f"no trial completed ({states.count('pruned')} pruned, {states.count('fail')} failed); "
                          f"see {out_dir / 'results.json'}")
    return result


def _enqueue_default(study, cfg, space: dict) -> None:
    """Trial 0 is the config as written, when its values lie inside the space: the best trial is then never
    worse on dev than the untuned default, and the table shows what tuning bought."""
    dumped = cfg.model_dump(mode="json")
    params = {}
    for key, spec in space.items():
        section, _, field = key.partition(".")
        value = dumped.get(section, {}).get(field) if field else dumped.get(section)
        inside = value in spec["choices"] if "choices" in spec else (
            value is not None and spec["low"] <= value <= spec["high"])
        if not inside:
            return
        params[key] = value
    study.enqueue_trial(params, user_attrs={"default": True}, skip_if_exists=True)


def _free_memory() -> None:
    """Drop the last trial's model and optimizer (reference cycles, e.g. an out-of-memory traceback)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fail(trial, msg: str):
    trial.set_user_attr("error", msg)
    print(f"trial {trial.number}: failed: {msg}", file=sys.stderr, flush=True)
    raise _TrialFailed(msg)


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _finish(study, raw: dict, spec: dict, out_dir: Path, stem: str, storage: str) -> dict:
    from optuna.trial import TrialState

    rows = [{"trial": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "train_seconds": t.user_attrs.get("train_seconds"), "error": t.user_attrs.get("error"),
             "dev_metrics": t.user_attrs.get("dev_metrics"), "run_dir": str(out_dir / f"trial-{t.number}")}
            for t in study.get_trials(deepcopy=False)]
    result = {"study": study.study_name, "storage": storage, "metric": spec["metric"],
              "direction": spec["direction"], "space": spec["space"], "best": None, "trials": rows}
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        cfg: RunConfig = build_config(_with(raw, {**best.params, "train.metric": spec["metric"]}))
        cfg.output_dir = f"runs/{stem}-best-{{time}}"
        _write(out_dir / "best.yaml", f"# sftlab tune: best of study {study.study_name!r} (trial {best.number}, dev "
               f"{spec['metric']}={best.value:.4f})\n" + dump_config(cfg))
        result["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                          "config": str(out_dir / "best.yaml"), "run_dir": str(out_dir / f"trial-{best.number}")}
    _write(out_dir / "results.json", json.dumps(result, indent=2))
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table(result: dict) -> str:
    keys = list(result["space"])
    best = (result["best"] or {}).get("trial")
    lines = [f"| trial | state | dev {result['metric']} | " + " | ".join(keys) + " | train s |",
             "|---:|---|---:|" + "---:|" * len(keys) + "---:|"]
    for r in result["trials"]:
        value = "" if r["value"] is None else f"{r['value']:.4f}" + (" *" if r["trial"] == best else "")
        state = r["state"] + (f" ({r['error']})" if r["error"] and r["state"] == "fail" else "")
        cells = [_fmt_params({k: r["params"][k]}).split("=", 1)[1] if k in r["params"] else "" for k in keys]
        secs = "" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
        lines.append(f"| {r['trial']} | {state} | {value} | " + " | ".join(cells) + f" | {secs} |")
    return "\n".join(lines)

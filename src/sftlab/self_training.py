"""`sftlab self-train CONFIG --rounds R --threshold P`: self-training with pseudo-labels on data.unlabelled.

Round 0 is the config as written (a run on the labels; with data.k_shot, its K rows per class; objective sft or
contrastive_pairs, whose pairs then take the pseudo-labelled rows as labelled ones). Round r >= 1
trains again from the same initialisation on round 0's labelled rows plus the unlabelled rows that round r-1's
best model labels with probability >= P, the same number per class (the most confident first; capped by
--max-per-class): Yarowsky 1995 and Lee 2013 ("Pseudo-Label"), with the class balance of Zou et al. 2018
(class-balanced self-training). The pitfall is confirmation bias (Arazo et al. 2020): a model's own confident
mistakes come back as labels, most of them in its favourite class; the balance and re-labelling the whole pool each
round (rather than accumulating round after round) are the two guards here, and a high threshold the third.

Each round is a child `sftlab train` into OUT/round-r/ (finished rounds are reused, so a stopped self-training
resumes); its labelled-plus-pseudo training file and pseudo.jsonl (rows as `sftlab predict` writes them) are
under OUT/data/ and copied into the round's run directory. `--distill` adds OUT/distill: the config's own model
trained with objective distill from the last round's best on the labels and the unlabelled stream (Xie et al.
2020's noisy student ends with the same move: a fresh student taught on the pool). `--round-0 RUN_DIR` takes a
finished run on the same labels as round 0 instead of training one: for domain adaptation, an objective mmd run
labels the target text (issue 17's best combination, +2.56 points over source-only on the review pairs).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .config import UNLABELLED_OBJECTIVES, _merge, build_config, dump_config, parse_overrides, read_yaml
from .data.kshot import labelled_sample
from .errors import ConfigError, RunDirError
from .sweep import row_of, run_jobs

UNLABELLED_KEYS = ("unlabelled", "unlabelled_text", "limit_unlabelled")


def split_config(path: str | None, overrides: list[str]):
    """(the rounds' base config without the unlabelled stream, that stream's data section): data.unlabelled is read
    by this recipe, not by the sft runs it launches."""
    raw = read_yaml(path, "config") if path else {}
    raw = _merge(raw, parse_overrides(overrides))
    data = dict(raw.get("data") or {})
    stream = {k: data.pop(k) for k in UNLABELLED_KEYS if k in data}
    if not stream.get("unlabelled"):
        raise ConfigError("sftlab self-train pseudo-labels data.unlabelled: set it to the unlabelled text (a file or "
                          "a list; the training file itself gives its rows outside the labelled sample)")
    base = build_config(raw | {"data": data})
    if base.task != "classification":
        raise ConfigError(f"sftlab self-train labels rows with classes: task classification, not {base.task}")
    if base.objective.name in UNLABELLED_OBJECTIVES:  # the others train each round as written (SetFit's pairs too)
        raise ConfigError(f"sftlab self-train reads data.unlabelled itself, and objective {base.objective.name} "
                          "would read it too; use objective sft or contrastive_pairs (--distill adds a distilled "
                          "student at the end, --round-0 RUN_DIR takes a finished run of any objective as round 0)")
    return base, base.data.model_copy(update=stream)


def select(rows: list[dict], names: list[str], threshold: float, max_per_class: int | None) -> tuple[list[dict], str]:
    """The rows at or above the threshold, the same number per class, most confident first (then file order)."""
    # 1.0 keeps nothing, even rows whose float softmax rounds to exactly 1: round 1 then reproduces round 0
    by = {n: sorted((r for r in rows if r["label"] == n and r["score"] >= threshold and threshold < 1),
                    key=lambda r: (-r["score"], r["line"])) for n in names}
    n = min(len(v) for v in by.values())
    if max_per_class is not None:
        n = min(n, max_per_class)
    note = ", ".join(f"{k} {len(v)}" for k, v in by.items())
    return sorted((r for v in by.values() for r in v[:n]), key=lambda r: r["line"]), \
        f"{n} per class (confident: {note})"


def check_round0(run: Path, names: list[str]) -> None:
    """--round-0 must be a finished classification run whose classes are the config's, in the same order."""
    if not (run / "summary.json").is_file() or not (run / "best").is_dir():
        raise RunDirError(f"--round-0 {run}: not a finished run (no summary.json and best/); train it first")
    have = json.loads((run / "labels.json").read_text()) if (run / "labels.json").is_file() else None
    if have != names:
        raise ConfigError(f"--round-0 {run}: its classes {have} are not this config's {names}; give a run "
                          "trained on the same labels")


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def self_train(config: str | None, overrides: list[str], out: Path, rounds: int, threshold: float,
               max_per_class: int | None = None, resume: bool = False, distill: bool = False,
               round0: Path | None = None) -> Path:
    from .data.prepare import _unlabelled
    from .eval.evaluate import load_trained, predict_examples
    from .precision import resolve

    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: at least 1 (round 0 trains on the labels, rounds 1..R add pseudo-labels)")
    if not 0 < threshold <= 1:
        raise ConfigError(f"--threshold {threshold}: a probability in (0, 1], e.g. 0.9")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"--max-per-class {max_per_class}: at least 1")
    base, stream = split_config(config, overrides)
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunDirError(f"--out {out} exists and is not empty; continue it with --resume or choose another --out")
    train, dev, labels = labelled_sample(base)
    if round0 is not None:
        check_round0(round0, labels.names)
    pool = _unlabelled(stream, "classification", {"train": train} | ({"dev": dev} if dev else {})).examples
    (out / "data").mkdir(parents=True, exist_ok=True)
    pair = train.examples[0].text_pair is not None

    def as_row(text: str, text_pair: str | None, label: str) -> dict:
        return {"text": text, **({"text_pair": text_pair} if pair else {}), "label": label}

    d = base.data
    later = {"train": None, "k_shot": None, "k_shot_dev": None, "limit_train": None, "text": "text",
             "text_pair": "text_pair" if pair else None, "label": "label", "labels": labels.names,
             "dev_columns": d.dev_columns or {k: v for k, v in (("text", d.text), ("text_pair", d.text_pair),
                                                                  ("label", d.label)) if v is not None}}
    if dev is not None:  # the true-few-shot dev rows drawn in round 0 stay every round's dev set
        write_jsonl(out / "data" / "dev.jsonl", [as_row(e.text, e.text_pair, labels.names[e.label])
                                                    for e in dev.examples])
        later |= {"dev": str((out / "data" / "dev.jsonl").resolve()), "dev_columns": None}
    history = []
    for r in range(rounds + 1):
        name = f"round-{r}"
        cfg = base
        if r == 0 and round0 is not None:
            history.append((name, row_of(name, round0, None)))
            continue
        if r:
            pseudo_file, train_file = out / "data" / f"{name}-pseudo.jsonl", out / "data" / f"{name}-train.jsonl"
            if not train_file.is_file():
                labeller = round0 if r == 1 and round0 is not None else out / f"round-{r - 1}"
                loaded = load_trained(str(labeller / "best"))  # the previous round's best labels the pool
                # The run's own precision (train.precision): a pinned fp32 run labels exactly as `sftlab predict`.
                rows = list(predict_examples(loaded, pool, bf16=resolve(base.train.precision),
                                             progress=f"pseudo-label {name}"))
                kept, note = select(rows, labels.names, threshold, max_per_class)
                print(f"{name}: {len(kept)} pseudo-labelled rows of {len(pool)} unlabelled, {note}", file=sys.stderr)
                write_jsonl(pseudo_file, kept)
                write_jsonl(train_file, [as_row(e.text, e.text_pair, labels.names[e.label]) for e in train.examples]
                            + [as_row(p["text"], p.get("text_pair"), p["label"]) for p in kept])
            later["train"] = str(train_file.resolve())
            cfg = build_config(_merge(base.model_dump(mode="json"), {"data": later}))
        variant = out / "data" / f"{name}.yaml"
        variant.write_text(dump_config(cfg), encoding="utf-8")
        row = run_jobs(str(variant), {name: []}, [], out, resume=True)[0]
        if "error" in row:
            raise RunDirError(f"{name} failed ({row['error']}); see the log above; rerun with --resume to continue")
        if r:
            shutil.copyfile(pseudo_file, out / name / "pseudo.jsonl")
        history.append((name, row))
    last = out / f"round-{rounds}"
    if distill:
        cfg = build_config(_merge(base.model_dump(mode="json"), {
            "objective": {"name": "distill", "teacher": str((last / "best").resolve())},
            "data": {k: v for k, v in stream.model_dump(mode="json").items() if k in UNLABELLED_KEYS}}))
        (out / "data" / "distill.yaml").write_text(dump_config(cfg), encoding="utf-8")
        row = run_jobs(str(out / "data" / "distill.yaml"), {"distill": []}, [], out, resume=True)[0]
        if "error" in row:
            raise RunDirError(f"distill failed ({row['error']}); rerun with --resume to continue")
        history.append(("distill", row))
        last = out / "distill"
    metric = history[0][1]["metric_name"]
    print(f"| run | dev {metric} |\n|---|---:|", file=sys.stderr)
    for name, row in history:
        print(f"| {name} | {row['metric']:.4f} |", file=sys.stderr)
    return last


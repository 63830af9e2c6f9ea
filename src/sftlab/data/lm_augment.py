"""`sftlab data augment CONFIG --method lm --model DECODER --per-example N --out FILE`: label-conditioned examples
written by a decoder, filtered by a classifier, with provenance per row.

For each labelled row (the config's training rows after data.k_shot) and each copy, the decoder sees `--shots`
other rows of the row's class (drawn by (seed, row, copy)) and is asked either to paraphrase the row (`--prompt
paraphrase`) or to write a new text of the class (`--prompt generate`), sampled (temperature, top-p). Kept: the
first line of each reply, cleaned, not a duplicate of another reply or of a labelled row (case and spaces
ignored), and, with `--filter RUN_DIR` (a classifier trained on the same K rows, e.g. the plain few-shot run), only
replies it labels as the intended class with probability >= `--min-confidence`: LAMBADA's filter (Anaby-Tavor et
al., AAAI 2020, "Do Not Have Enough Data? Deep Learning to the Rescue!"). The pitfall it guards against: a small
decoder writes off-label or generic text, and unfiltered it teaches the classifier noise (their ablation: the filter
is most of the gain).

The output is a training file in the config's own columns (so `data.train=FILE` with data.k_shot unset trains on
it): the labelled rows first (provenance "source"; --only-new leaves them out), then the new rows, each with a
`provenance` object (generator, prompt kind, source line, copy, seed, filter score).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

PROMPTS = {
    "paraphrase": "Here are some {about} labelled {word}:\n{shots}\nRewrite this {word} {about_one} in other words, "
                  "keeping its meaning and its {word} tone. Reply with the rewritten text only, on one line.\n"
                  "Text: {text}",
    "generate": "Here are some {about} labelled {word}:\n{shots}\nWrite one new, different {about_one} that is "
                "clearly {word}. Reply with the text only, on one line.",
}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


PREAMBLE = re.compile(r"^(here('s| is| are)|sure|certainly|okay|ok)\b|:$", re.I)


def clean(reply: str) -> str:
    """The first non-empty line that is not a preamble ("Here is a rewritten version:"), without a leading label,
    bullet, number or quotes."""
    line = next((x.strip() for x in reply.splitlines() if x.strip() and not PREAMBLE.search(x.strip())), "")
    line = re.sub(r"^(text|rewritten text|rewritten version|new text|review|sentence|title)\s*:\s*", "", line,
                  flags=re.I)
    line = re.sub(r"^([-*•]|\d+[.)])\s+", "", line)
    return line.strip().strip('"“”\'').strip()


def lm_augment(cfg, *, model: str, per_example: int, out: Path, prompt: str = "paraphrase", shots: int = 4,
               filter_run: str | None = None, min_confidence: float = 0.9, seed: int = 0, batch_size: int = 16,
               max_new_tokens: int = 64, temperature: float = 0.9, top_p: float = 0.95, about: str = "text",
               only_new: bool = False) -> dict:
    from ..eval.gen_eval import load_generator
    from ..eval.generate import generate
    from ..data.chat_template import prompt_ids
    from .examples import Example
    from .kshot import labelled_sample

    if cfg.task != "classification":
        raise ConfigError(f"--method lm writes texts for a class: it needs task classification, not {cfg.task} "
                          "(label-preserving edits for regression: data.augment eda)")
    if cfg.data.text_pair is not None:
        raise ConfigError("--method lm writes single texts; sentence-pair tasks (data.text_pair) are not supported")
    if prompt not in PROMPTS:
        raise ConfigError(f"--prompt {prompt}: use {' or '.join(PROMPTS)}")
    if per_example < 1 or shots < 0:
        raise ConfigError("--per-example must be >= 1 and --shots >= 0")
    if not 0 < min_confidence <= 1:
        raise ConfigError(f"--min-confidence {min_confidence}: a probability in (0, 1]")
    if out.exists():
        raise ConfigError(f"--out {out} exists; choose another file (nothing was overwritten)")
    train, _, labels = labelled_sample(cfg)
    words = {n: (cfg.data.label_words or {}).get(n, n) for n in labels.names}
    if all(re.fullmatch(r"-?\d+", w) for w in words.values()):
        raise ConfigError(f"the classes are named {labels.names}: give the generator words for them with "
                          "data.label_words, e.g. data.label_words='{\"0\": negative, \"1\": positive}'")
    by_class = {c: [e for e in train.examples if e.label == c] for c in range(len(labels.names))}
    gen_model, tok, meta = load_generator(model)
    jobs, prompts = [], []
    for e in train.examples:
        for c in range(per_example):
            rng = np.random.default_rng([seed, e.line, c])
            pool = [x for x in by_class[e.label] if x.line != e.line]
            picked = [pool[i] for i in rng.permutation(len(pool))[:shots]]
            word = words[labels.names[e.label]]
            text = PROMPTS[prompt].format(about=f"{about}s", about_one=about, word=word, text=e.text,
                                          shots="\n".join(f"- {x.text}" for x in picked) or "(none)")
            jobs.append((e, c))
            prompts.append(prompt_ids(tok, [{"role": "user", "content": text}], meta.get("template")))
    print(f"generating {len(prompts)} examples ({per_example} per labelled row, {prompt}) with {model}",
          file=sys.stderr)
    t0 = time.time()
    from ..precision import resolve

    replies = generate(gen_model, tok, prompts, max_new_tokens=max_new_tokens, do_sample=True, bf16=resolve("auto"),
                       temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                       stop=[tok.eos_token] if tok.eos_token else None, progress=True)
    seconds = time.time() - t0
    seen = {_norm(e.text) for e in train.examples}
    rows = []
    for (e, c), reply in zip(jobs, replies):
        text = clean(reply)
        if len(text) < 3 or _norm(text) in seen:
            continue
        seen.add(_norm(text))
        rows.append({"example": Example(text, None, e.label, e.line), "copy": c})
    unique = len(rows)
    if filter_run is not None and rows:
        from ..eval.evaluate import load_trained, predict_examples

        loaded = load_trained(filter_run)
        if loaded[2]["labels"] != labels.names:
            raise ConfigError(f"--filter {filter_run}: its classes {loaded[2]['labels']} are not the config's "
                              f"{labels.names}")
        scored = list(predict_examples(loaded, [r["example"] for r in rows], progress="filter"))
        for r, s in zip(rows, scored):
            r["score"] = s["scores"][labels.names[r["example"].label]]
        rows = [r for r, s in zip(rows, scored) if s["label"] == labels.names[r["example"].label]
                and s["score"] >= min_confidence]
    stats = {"generated": len(prompts), "unique": unique, "kept": len(rows),
             "seconds": round(seconds, 1), "generated_per_s": round(len(prompts) / max(seconds, 1e-9), 2)}
    if not rows:
        raise DataError(f"no generated row survived ({stats}); nothing written to {out}; try --prompt generate, more "
                        "--per-example, or a lower --min-confidence")
    tcol = cfg.data.text if isinstance(cfg.data.text, str) else "text"
    lcol = cfg.data.label if isinstance(cfg.data.label, str) else "label"
    lines = [] if only_new else [{tcol: e.text, lcol: labels.names[e.label], "provenance": {"source": "labelled",
                                                                                         "line": e.line}}
                                 for e in train.examples]
    for r in rows:
        e = r["example"]
        lines.append({tcol: e.text, lcol: labels.names[e.label], "provenance": {
            "source": "lm", "generator": str(model), "prompt": prompt, "from_line": e.line, "copy": r["copy"],
            "seed": seed, **({"filter": str(filter_run), "filter_score": round(r["score"], 6)} if filter_run else {})}})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as f:
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
    return stats | {"written": len(lines)}

"""From config to encoded splits plus a human-readable report (shared by `train` and `data check`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..errors import DataError
from .batches import Encoded, encode
from .examples import LabelMap, Split, load_split, resolve_path
from .kshot import take_k_shot


@dataclass
class Prepared:
    labels: LabelMap | None
    splits: dict[str, Split] = field(default_factory=dict)
    encoded: dict[str, Encoded] = field(default_factory=dict)
    lm_report: dict = field(default_factory=dict)

    def report(self, task: str) -> dict:
        """Rows, skipped rows by reason, truncation, label balance, token-length percentiles per split."""
        if task in ("causal_lm", "multitask"):  # built while preparing (multitask: per task and split)
            return self.lm_report
        out = {}
        for name, split in self.splits.items():
            enc = getattr(self.encoded[name], "a", self.encoded[name])  # embedding's dev pairs: first texts
            lengths = np.array(enc.raw_lengths or enc.lengths)  # before truncation: what max_length is needed
            info = {
                "source": split.source,
                "rows": len(split.examples),
                "skipped": dict(split.skipped),
                "truncated": enc.truncated,
                "capped": enc.capped,
                "tokens": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
            }
            if name == "unlabelled" or task in ("masked_lm", "embedding"):
                pass
            elif task == "classification":
                counts = Counter(self.labels.names[e.label] for e in split.examples)
                info["labels"] = {n: counts.get(n, 0) for n in self.labels.names}
            else:
                y = np.array([e.label for e in split.examples])
                info["target"] = {"min": float(y.min()), "mean": float(y.mean()), "max": float(y.max())}
            out[name] = info
        return out


def prepare(cfg: RunConfig, tokenizer, splits=("train", "dev", "test")) -> Prepared:
    """Validate every row of every configured split (train first: it defines the label map), then tokenize."""
    if cfg.task == "causal_lm":
        return _prepare_lm(cfg, tokenizer, splits)
    if cfg.task == "multitask":
        from ..tasks.multitask import prepare_multitask

        return prepare_multitask(cfg, tokenizer, splits)
    if cfg.task == "masked_lm":
        from .text import prepare_masked

        return prepare_masked(cfg, tokenizer, splits)
    if cfg.task == "embedding":
        from .text import prepare_embedding

        return prepare_embedding(cfg, tokenizer, splits)
    d = cfg.data
    limits = {"train": d.limit_train, "dev": d.limit_dev, "test": None}
    out = Prepared(labels=None)
    for name in splits:
        path = getattr(d, name)
        if path is None:
            continue
        cols = d.model_copy(update=d.dev_columns) if d.dev_columns and name != "train" else d
        split, out.labels = load_split(cols, path, cfg.task, out.labels, limit=limits[name])
        if name == "dev" and d.k_shot and d.train and _same_file(d, path, d.train) and "train" in out.splits:
            # the training file as dev set beside a k-shot sample: its rows outside the sample (`sftlab adapt`)
            taken = {e.line for e in sample.examples}
            kept = [e for e in split.examples if e.line not in taken]
            split = Split(f"{split.source} (minus its {len(split.examples) - len(kept)} k-shot rows)", kept,
                          split.skipped)
        if name == "train" and d.k_shot:
            split, dev = take_k_shot(split, out.labels.names, d.k_shot, d.k_shot_seed, d.k_shot_dev)
            sample = split
            if dev is not None and "dev" in splits:
                out.splits["dev"], out.encoded["dev"] = dev, encode(tokenizer, dev.examples, d.max_length)
        if name == "train" and d.augment is not None:
            from .eda import augment

            n = len(split.examples)
            split = Split(f"{split.source} (+ {d.augment.copies} {d.augment.name} copies of each of {n} rows)",
                          augment(split.examples, d.augment), split.skipped)
        out.splits[name] = split
        out.encoded[name] = encode(tokenizer, split.examples, d.max_length)
    if d.unlabelled is not None and "train" in splits:  # labels ignored: the teacher provides the targets
        out.splits["unlabelled"] = split = _unlabelled(d, cfg.task, out.splits)
        out.encoded["unlabelled"] = encode(tokenizer, split.examples, d.max_length)
    return out


def _same_file(d, a: str, b: str) -> bool:
    return Path(resolve_path(d, a)).resolve() == Path(resolve_path(d, b)).resolve()


def _unlabelled(d, task: str, labelled: dict[str, Split]) -> Split:
    """The unlabelled files as one split, in file order, read through their own text column when one is given.

    The training file named as unlabelled text (semi-supervised: few labels, the rest of the file as text) gives its
    rows that are not in the train split or a dev split drawn from it (data.limit_train, data.k_shot)."""
    files = [d.unlabelled] if isinstance(d.unlabelled, str) else list(d.unlabelled)
    cols = d if d.unlabelled_text is None else d.model_copy(update={"text": d.unlabelled_text})
    train_file = Path(resolve_path(d, d.train)).resolve() if d.train else None
    drawn = ("train", "dev") if d.k_shot_dev else ("train",)  # the splits read from the training file
    taken = {e.line for name in drawn if name in labelled for e in labelled[name].examples}
    out = None
    for path in files:
        left = None if d.limit_unlabelled is None else d.limit_unlabelled - (len(out.examples) if out else 0)
        if left == 0:
            break
        same = train_file is not None and Path(resolve_path(d, path)).resolve() == train_file
        try:
            split, _ = load_split(cols, path, task, None, limit=None if same else left, need_label=False)
        except DataError as e:
            hint = "; name the unlabelled files' text column with data.unlabelled_text" if "no column" in str(e) else ""
            raise DataError(f"{e}{hint}") from None
        if same:
            kept = [e for e in split.examples if e.line not in taken]
            split = Split(f"{split.source} (minus its {len(split.examples) - len(kept)} labelled rows)",
                          kept[:left] if left is not None else kept, split.skipped)
            if not split.examples:
                raise DataError(f"data.unlabelled: {path} is the training file and every row of it is labelled; "
                                "name other text, or take fewer labelled rows (data.k_shot, data.limit_train)")
        if out is None:
            out = split
        else:
            out.source, out.examples = f"{out.source} + {split.source}", out.examples + split.examples
            out.skipped.update(split.skipped)
    return out


def format_report(report: dict) -> str:
    lines = []
    for name, r in report.items():
        if "share" in r:  # multitask: the sampler's share of steps per task (10,000 draws)
            lines.append(f"{name}: {r['sampler']}, expected share of steps: "
                         + ", ".join(f"{k} {v:.1%}" for k, v in r["share"].items()))
            continue
        if "loss_tokens" in r:  # causal_lm
            t = r["tokens_per_example"]
            extra = "".join(f", {k} {r[k]}" for k in ("skipped", "truncated", "dropped") if r[k])
            packs = f", {r['packs']} packs (fill {r['pack_fill']:.0%})" if "packs" in r else ""
            lines.append(f"{name}: {r['examples']} examples, {r['tokens']} tokens ({r['loss_tokens']} with loss)"
                         f"{packs}{extra}; tokens p50={t['p50']} p90={t['p90']} max={t['max']}  [{r['source']}]")
            continue
        extra = ", ".join(f"{k}={v}" for k, v in r.get("labels", r.get("target", {})).items()) or "labels ignored"
        skipped = f", skipped {sum(r['skipped'].values())} {r['skipped']}" if r["skipped"] else ""
        trunc = f", truncated {r['truncated']} (longer than data.max_length)" if r["truncated"] else ""
        t = r["tokens"]
        lines.append(
            f"{name}: {r['rows']} rows ({extra}){skipped}{trunc}; "
            f"tokens p50={t['p50']} p90={t['p90']} p99={t['p99']} max={t['max']}{'+' if r.get('capped') else ''} "
            f"(before truncation)  [{r['source']}]"
        )
    return "\n".join(lines)


def _prepare_lm(cfg: RunConfig, tokenizer, splits) -> Prepared:
    from .chat import encode_conversations, rows_to_conversations
    from .columns import to_prompt_completion
    from .examples import resolve_path
    from .lm import build, pack
    from .read import read_table

    d = cfg.data
    limits = {"train": d.limit_train, "dev": d.limit_dev, "test": None}
    out = Prepared(labels=None)
    for name in splits:
        path = getattr(d, name)
        if path is None:
            continue
        source = resolve_path(d, path)
        if d.format == "text":  # raw text: continued pre-training (data/text.py)
            from .text import encode_lm_text, load_text

            split = load_text(d, path, limit=limits[name])
            enc = encode_lm_text(tokenizer, split, d.max_length)
            lengths = np.array(enc.lengths) if len(enc) else np.zeros(1)
            info = {"source": split.source, "rows": len(split.examples), "examples": len(enc),
                    "skipped": dict(split.skipped), "truncated": 0, "dropped": 0,
                    "loss_tokens": int(sum(enc.weights)), "tokens": int(lengths.sum()),
                    "tokens_per_example": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
                    | {"max": int(lengths.max())}}
            if d.packing and name == "train":
                enc = pack(enc, d.max_length)
                info["packs"] = len(enc)
                info["pack_fill"] = round(float(lengths.sum()) / (len(enc) * d.max_length), 4)
            out.encoded[name], out.lm_report[name] = enc, info
            continue
        table = read_table(source, header=True, skip_invalid=d.skip_invalid)
        if d.prompt is not None:
            table = to_prompt_completion(table, d.model_copy(update={"format": "prompt_completion"}))
        fmt = d.model_copy(update={"format": "prompt_completion"}) if d.prompt is not None else d
        convs, skipped = rows_to_conversations(table, fmt)
        if limits[name]:
            convs = convs[: limits[name]]
        ids, masks, counts = encode_conversations(tokenizer, convs, d)
        enc = build(ids, masks, counts)
        lengths = np.array(enc.lengths) if len(enc) else np.zeros(1)
        info = {"source": source, "rows": len(convs), "examples": len(enc), "skipped": dict(skipped),
                "truncated": counts.get("truncated", 0), "dropped": counts.get("dropped", 0),
                "loss_tokens": int(sum(enc.weights)), "tokens": int(lengths.sum()),
                "tokens_per_example": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
                | {"max": int(lengths.max())}}
        if d.packing and name == "train":
            enc = pack(enc, d.max_length)
            info["packs"] = len(enc)
            info["pack_fill"] = round(float(lengths.sum()) / (len(enc) * d.max_length), 4)
        out.encoded[name] = enc
        out.lm_report[name] = info
    return out

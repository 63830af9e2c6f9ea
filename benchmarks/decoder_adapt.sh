#!/usr/bin/env bash
# Issue 17, measurement 3: smollm2-135m-instruct continued pre-training (causal LM, every token) on review text, then
# the SST-2-as-chat LoRA run (configs/instruct/sst2_lora.yaml) from the base and from the adapted model.
# Usage: SFTLAB_DATA_DIR=../shared/data bash benchmarks/decoder_adapt.sh [OUT]   (default runs/decoder-adapt)
# Text: PER_DOMAIN (300) train texts and 100 dev texts of each product domain of reviews/ (labels dropped), written
# to OUT as .txt files. Continued pre-training: full fine-tuning (its best/ is a whole model a later run starts from),
# 1 epoch, lr 2e-5, max_length 256, packed. "Before" is the same run cut to one step at lr 1e-12 (the base weights:
# an update of ~1e-12 per weight), so both perplexities come from the same code on the same dev pieces.
# Each step is skipped when its run finished, so the script resumes where it stopped. Prints a table.
OUT=${1:-runs/decoder-adapt}
source "$(dirname "$0")/_steps.sh"
mkdir -p "$OUT"
.venv/bin/python - "$OUT" "${PER_DOMAIN:-300}" <<'EOF'
import json, os, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
root = Path(os.environ["SFTLAB_DATA_DIR"]) / "reviews"
for split, k in (("train", n), ("dev", 100)):
    texts = []
    for domain in ("books", "dvd", "electronics", "kitchen"):
        rows = [json.loads(line) for line in (root / domain / f"{split}.jsonl").read_text().splitlines() if line]
        texts += [" ".join(r["text"].split()) for r in rows[:k]]  # one text per line: no newlines inside
    (out / f"{split}.txt").write_text("\n".join(texts) + "\n")
EOF
CFG=configs/instruct/sst2_lora.yaml
TEXT=(data.format=text data.train="$OUT/train.txt" data.dev="$OUT/dev.txt" data.limit_train=null data.prompt=null
      data.completion=null data.label_words=null strategy.name=full train.batch_size=8 train.lr=2e-5)
step cpt-before $CFG "${TEXT[@]}" train.max_steps=1 train.lr=1e-12 train.warmup_ratio=0
step cpt $CFG "${TEXT[@]}" train.epochs=1
step sst2-base $CFG
step sst2-adapted $CFG model.name="$OUT/cpt/best"
for run in sst2-base sst2-adapted; do
  [ -s "$OUT/$run/label-accuracy.json" ] || { "$SFTLAB" eval "$OUT/$run" --config $CFG --data glue/sst2/dev.tsv \
    --labels positive,negative | tail -1 > "$OUT/$run/.acc.tmp" && mv "$OUT/$run/.acc.tmp" "$OUT/$run/label-accuracy.json"; }
done
.venv/bin/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
dev = lambda run: json.loads((out / run / "summary.json").read_text())["dev_metrics"]  # noqa: E731
acc = lambda run: json.loads((out / run / "label-accuracy.json").read_text())  # noqa: E731
print("| model | review dev perplexity | SST-2 dev label accuracy (LoRA on 2,000 labels) |\n|---|---:|---:|")
print(f"| smollm2-135m-instruct | {dev('cpt-before')['perplexity']:.2f} | {acc('sst2-base')['label_accuracy']:.4f} |")
print(f"| + continued pre-training on reviews | {dev('cpt')['perplexity']:.2f} | {acc('sst2-adapted')['label_accuracy']:.4f} |")
print(json.dumps({"perplexity": {"before": dev("cpt-before"), "after": dev("cpt")},
                  "label_accuracy": {"base": acc("sst2-base"), "adapted": acc("sst2-adapted")}}))
EOF

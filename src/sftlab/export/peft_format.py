"""`peft`: the adapter alone (adapter_config.json + adapter_model.safetensors, the trained head included via
peft's modules_to_save) and the tokenizer. `PeftModel.from_pretrained(base, DIR)` loads it on the base model named
in adapter_config.json (`base_model_name_or_path`, also `base_path` in sftlab_export.json)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

SKIP = {"sftlab.json"}


def write_peft(model_dir: Path, meta: dict, out: Path) -> dict:
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and f.name not in SKIP:
            shutil.copy2(f, out / f.name)
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = meta["base_path"]  # an absolute folder: loads offline
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return {"peft_type": cfg.get("peft_type"), "base_path": meta["base_path"]}

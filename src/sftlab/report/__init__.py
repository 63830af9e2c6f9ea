"""`sftlab report RUN_DIR [RUN_DIR ...]`: one self-contained HTML file (plots inlined as PNG data URIs).

collect.py reads run directories, plots.py draws, render.py formats and template.py lays out the page.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import RunDirError


def output_path(run_dirs: list[Path], out: str | None, overwrite: bool) -> Path:
    """--out is the user's file: never replaced silently. The defaults are ours to (over)write."""
    if out is not None:
        path = Path(out)
        if path.exists() and not overwrite:
            raise RunDirError(f"--out {out} exists; choose another file or pass --overwrite to replace it")
        if path.is_dir():
            raise RunDirError(f"--out {out} is a directory; give a file name such as {path / 'report.html'}")
        return path
    if len(run_dirs) == 1:
        return run_dirs[0] / "report.html"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = Path("runs") / f"report-{stamp}.html", 1
    while path.exists():  # two reports in the same second keep both
        path, k = Path("runs") / f"report-{stamp}-{k}.html", k + 1
    return path


def build_report(paths: list[str], out: str | None = None, overwrite: bool = False, evaluate: bool = True) -> Path:
    """Write the report and return its path. All arguments are checked before any model is loaded."""
    from .collect import find_run_dir, load_run, run_names
    from .render import render, write_atomic

    run_dirs = [find_run_dir(p) for p in paths]
    target = output_path(run_dirs, out, overwrite)
    runs = []
    for path, name in zip(run_dirs, run_names(run_dirs)):
        print(f"report: reading {path}", file=sys.stderr)
        runs.append(load_run(path, name, evaluate=evaluate))
    write_atomic(target, render(runs))
    return target

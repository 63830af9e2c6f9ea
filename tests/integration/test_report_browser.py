"""Integration: a report opened in real headless Chromium (Debian's `chromium`) shows every plot and table.

Two proofs that the images really render, not just that tags exist: (1) a probe script, added to a copy of
the page, records after `load` how many `img[data-plot]` decoded (complete, naturalWidth > 0) and
--dump-dom returns that; (2) a screenshot of the unmodified page contains many pixels of the plots' line
colour, which only decoded PNGs can paint (the page's own CSS has no such colour).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.train.loop import train

pytestmark = pytest.mark.integration

PLOT_BLUE = (0x1F, 0x77, 0xB4)  # matplotlib's tab:blue, the first run's colour in every plot
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img[data-plot]")];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.body.dataset.plotsTotal = imgs.length;
  document.body.dataset.plotsOk = ok.length;
  document.body.dataset.broken = imgs.filter(i => !ok.includes(i)).map(i => i.dataset.plot).join(",");
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI installs it in .ci/run (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI runs this test")
    return exe


def browse(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)  # a fresh profile per launch
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


class Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.body, self.plots, self.tables, self.pres = {}, [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "img" and "data-plot" in a:
            self.plots.append(a["data-plot"])
        elif tag == "table":
            self.tables.append(a.get("id") or a.get("class"))
        elif tag == "pre":
            self.pres.append(a.get("class"))


def test_report_renders_in_chromium(tiny_overrides, tmp_path, capsys):
    exe = chromium()
    run = train(load_config(None, tiny_overrides))
    assert main(["report", str(run)]) == 0
    report = Path(capsys.readouterr().out.strip().splitlines()[-1])

    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    dom = Dom()
    dom.feed(browse(exe, tmp_path, "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
                    "--dump-dom", probed.as_uri()).stdout)
    expected = {"loss", "dev", "lr", "throughput", "confusion-run", "reliability-run"}
    assert set(dom.plots) == expected
    assert dom.body.get("data-plots-ok") == dom.body.get("data-plots-total") == str(len(expected)), dom.body
    assert {"summary", "metrics", "per-class", "by-length", "worst"} <= set(dom.tables)
    assert "config" in dom.pres

    shot = tmp_path / "report.png"
    browse(exe, tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 4000)
    pixels = img.getdata()
    blue = sum(1 for p in pixels if all(abs(c - t) <= 12 for c, t in zip(p, PLOT_BLUE)))
    assert blue > 2000, f"only {blue} plot-coloured pixels in {shot}: plots did not paint"
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 200  # anti-aliased plots and text, not a blank page

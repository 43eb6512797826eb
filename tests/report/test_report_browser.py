"""The report in a real browser: Debian's headless Chromium renders the page of a small run.

Chromium is installed with apt-get when it is missing (see tests/report/chromium.py); the tests are
skipped, with the reason printed, only where that is impossible. Checks: every section is present
and has a height, every <img> decodes, and the page raises no error (script errors, console
messages, failed resource loads). A control page with a broken image and a console error proves the
checks catch what they look for.
"""
from __future__ import annotations

import html
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from swav.report import SECTION_IDS

from .chromium import ensure_chromium
from .pageparse import ReportPage

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]

# Injected first in <head> of a test copy of the page: records errors; at load (when every image has
# loaded and decoded, or failed with naturalWidth 0) writes what it found as JSON into
# <pre id="swav-browser-check">, which --dump-dom prints.
CHECK_SCRIPT = """<script>
window.__problems = [];
window.addEventListener("error", e => {
  const t = e.target;
  window.__problems.push(t && t !== window ? "failed to load <" + t.tagName + "> " + String(t.src || t.href).slice(0, 80)
                                           : "script error: " + e.message);
}, true);
window.addEventListener("unhandledrejection", e => window.__problems.push("unhandled rejection: " + e.reason));
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { window.__problems.push("console." + level + ": " + args.join(" ")); original.apply(console, args); };
}
window.addEventListener("load", () => {  // synchronous: --dump-dom does not wait for promises
  const images = [...document.images].map(im => ({alt: im.alt, decoded: im.complete && im.naturalWidth > 0,
                                                  width: im.naturalWidth, height: im.naturalHeight}));
  const sections = [...document.querySelectorAll("section[id]")].map(s => [s.id, s.getBoundingClientRect().height]);
  const pre = document.createElement("pre");
  pre.id = "swav-browser-check";
  pre.textContent = JSON.stringify({images, sections, problems: window.__problems});
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def chromium():
    path, why = ensure_chromium()
    if path is None:
        print(f"\nskipping the browser tests: {why}")
        pytest.skip(why)
    return path


def run_chromium(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def browser_check(chromium: str, page: Path, tmp_path: Path) -> tuple[dict, str]:
    """(what the injected script found, chromium's stderr) for a copy of ``page``."""
    text = page.read_text(encoding="utf-8")
    checked = tmp_path / f"checked-{page.name}"
    checked.write_text(text.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    res = run_chromium(chromium, checked, tmp_path / "profile-dom", "--dump-dom")
    m = re.search(r'<pre id="swav-browser-check">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the check script left no result (chromium rc {res.returncode}):\n{res.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1))), res.stderr


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_in_chromium(chromium, finished_report, tmp_path):
    found, stderr = browser_check(chromium, finished_report, tmp_path)
    assert [sid for sid, _ in found["sections"]] == list(SECTION_IDS)
    assert all(height > 50 for _, height in found["sections"]), found["sections"]
    n_img = len(ReportPage(finished_report.read_text(encoding="utf-8")).images)
    assert len(found["images"]) == n_img > 20
    bad = [im for im in found["images"] if not (im["decoded"] and im["width"] > 0 and im["height"] > 0)]
    assert not bad, bad
    assert found["problems"] == []
    assert console_lines(stderr) == []

    # the page as shipped (no injected script) logs nothing either, and paints a non-blank screenshot
    shot = tmp_path / "shot.png"
    res = run_chromium(chromium, finished_report, tmp_path / "profile-shot", f"--screenshot={shot}",
                       "--window-size=1400,2400")
    assert console_lines(res.stderr) == [], console_lines(res.stderr)
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    assert img.size == (1400, 2400)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page


def test_the_browser_checks_catch_errors(chromium, tmp_path):
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head><body>'
                       '<section id="run">x</section><img alt="broken" src="data:image/png;base64,AAAA">'
                       '<img alt="absent" src="absent.png"><script>console.error("boom"); nosuch();</script>'
                       "</body></html>", encoding="utf-8")
    found, stderr = browser_check(chromium, control, tmp_path)
    assert {im["alt"]: im["decoded"] for im in found["images"]} == {"broken": False, "absent": False}
    problems = " | ".join(found["problems"])
    assert "console.error: boom" in problems and "script error" in problems and "failed to load <IMG>" in problems
    assert any("nosuch" in line for line in console_lines(stderr))


def test_missing_chromium_gives_a_reason(monkeypatch):
    from . import chromium as helper

    monkeypatch.setattr(helper, "find_chromium", lambda: None)
    monkeypatch.setattr(helper.shutil, "which", lambda name: None)
    path, why = helper.ensure_chromium()
    assert path is None and "apt-get is not available" in why

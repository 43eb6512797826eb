"""bench/gpu_check.py, issue 22's one prepared GPU check, runs end to end in its CPU dry run (tiny
sizes), so the script cannot rot between the sessions that lend a GPU: every part writes its row,
the official code's part says "not present" where its checkout is absent (CI: it is never committed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "dry.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--data-dir", str(tmp_path / "data"), "--workers", "1"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    synthetic = parts["synthetic"]
    assert {"bs8 channels_last=false", "bs8 channels_last=auto", "bs16 channels_last=auto"} <= synthetic.keys()
    assert synthetic["bs8 channels_last=auto"]["channels_last"] is False  # fp32 dry run: auto is off
    assert all(synthetic[k]["images_per_s"] > 0 for k in synthetic if "channels_last" in k)
    e2e = parts["end_to_end"]
    assert e2e["swav prepare"]["seconds"] > 0
    for name in ("raw 12-MP JPEGs", "after swav prepare"):
        assert e2e[name]["images_per_s"] > 0 and "decoded at mean side" in e2e[name]["data"]
    official = parts["official"]["result"]
    assert official["present"] is False or "skipped" in official or official["step_images_per_s"] > 0
    assert parts["demo"]["fashion-mnist"]["images_per_s"] > 0
    assert parts["summary"]["ratios"]["end to end / synthetic"] > 0

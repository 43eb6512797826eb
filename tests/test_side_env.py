"""The tests that need timm, torchvision, onnx and onnxruntime (``tests/sideenv/`` and the timm and
torchvision cases of ``tests/test_families.py``) run in the side environment that ``make
interop-env`` builds (``.venv-torchvision``; none of these libraries is ever installed in ``.venv``):
this test starts that environment's pytest on them and passes when every one of them passes there.

Without the side environment it skips, naming the command that builds it; with
``SWAV_REQUIRE_TORCHVISION=1`` (as in .ci/run) it fails instead, and so does any test there that
would skip for a missing library.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_torchvision_interop import BUILD_COMMAND, TV_ENV, _missing_env, _tv_python

REPO = Path(__file__).resolve().parents[1]
SIDE_TESTS = ["tests/sideenv", "tests/test_families.py"]
LIBRARIES = ("timm", "torchvision", "onnx", "onnxscript", "onnxruntime", "pytest", "swav")

pytestmark = pytest.mark.slow


def test_side_environment_suite():
    python = _tv_python()
    probe = subprocess.run([str(python), "-c", f"import {', '.join(LIBRARIES)}"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        _missing_env(f"the side environment at {TV_ENV} lacks a library ({probe.stderr.strip().splitlines()[-1]})",
                     f"rm -rf {TV_ENV} && {BUILD_COMMAND}")
    t0 = time.perf_counter()
    r = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *SIDE_TESTS],
                       cwd=REPO, capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "SWAV_SIDE_ENV": "1", "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-40:])
    print(f"\nside environment ({python}): {tail.splitlines()[-1] if tail else '?'} [{seconds:.0f} s]")
    assert r.returncode == 0, f"the side-environment tests failed (exit {r.returncode}):\n{tail}"
    summary = tail.splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "failed" not in summary, tail

"""Tests that need the optional libraries (timm, torchvision, onnx, onnxscript, onnxruntime): they run
in the side environment that ``make interop-env`` builds (``.venv-torchvision``), where
``tests/test_side_env.py`` starts pytest on this folder with ``SWAV_SIDE_ENV=1``. Anywhere else
(``.venv``, which never has these libraries) they are not collected."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("SWAV_SIDE_ENV") != "1":
    collect_ignore_glob = ["test_*.py"]

REPO = Path(__file__).resolve().parents[2]


def run_swav(*args, timeout=300, check=True) -> subprocess.CompletedProcess:
    """The ``swav`` command of this environment, one thread (as a small CPU job runs best)."""
    r = subprocess.run([sys.executable, "-m", "swav.cli", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, f"swav {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # features compared with a library's: the same thread count, the same sums
    yield
    torch.set_num_threads(before)

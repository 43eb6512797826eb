"""A 2-process torchrun run (gloo, CPU, loopback) equals a 1-process run with the same global batch,
and resumes with 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--set", "data.subset=256", "--set", "train.batch_size=32", "--set", "train.epochs=2",
            "--set", "train.log_every=1", "--set", "swav.queue_length=64", "--set", "swav.epoch_queue_starts=0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, out, root, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = cmd + ["-m", "swav.cli", "pretrain", "--preset", "smoke", "--no-report", "--out", str(out),
                  "--set", f"data.root={root}", *SETTINGS, *extra]
    proc = subprocess.run(full, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(full)} failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


@pytest.mark.slow
def test_two_processes_equal_one_then_resume_with_one(tmp_path, fake_fmnist):
    one = run([sys.executable], tmp_path / "one", fake_fmnist, "--max-steps", "5")
    two = run(torchrun(2), tmp_path / "two", fake_fmnist, "--max-steps", "5")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):  # global-batch losses, the queue in use from step 3
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    assert two[-1]["queue_in_use"] == 1
    # resume the 2-process run with one process, to the end of epoch 2 (16 steps)
    resumed = run([sys.executable], tmp_path / "two", fake_fmnist)
    assert [r["step"] for r in resumed][-1] == 16
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "written by 2 process(es), now 1" in log

"""Faults during pretraining: each interrupted run, resumed, ends exactly where an uninterrupted
run ends (weights, BatchNorm statistics, optimizer, queue, kept epoch copies, losses), and no file
is ever left truncated.

Every run here is the CLI in a subprocess with OMP_NUM_THREADS=1 (equal thread counts make runs
bitwise comparable), on the bad-input corpus with one data-loader worker, so these runs also carry
bad files through the workers. The SIGKILL-at-a-random-moment case is in tests/test_trainer.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swav.checkpoint import load_run_state

from .conftest import (CORPUS_SETTINGS, CORPUS_STEPS, assert_every_checkpoint_loads, assert_same_run, cli_cmd,
                       cli_env, display, logged_steps, pretrain_corpus, start_cli, wait_for_step, REPO)


def _stop(proc: subprocess.Popen, sig: int, group: bool) -> str:
    if proc.poll() is None:
        (os.killpg if group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return err


def test_sigusr1_then_sigterm_to_the_process_group_then_resume(tmp_path, corpus, corpus_reference):
    """SLURM pre-emption signals every process of the job, data-loader workers included: each
    signal makes the run finish its step, write a checkpoint and exit 0; resuming is exact."""
    out = tmp_path / "run"
    for sig, after in ((signal.SIGUSR1, 2), (signal.SIGTERM, 5)):
        proc = start_cli("pretrain", "--data", corpus.root, "--out", out, *CORPUS_SETTINGS)
        wait_for_step(proc, out, after)
        assert proc.poll() is None, "the run ended before the signal could be sent"
        err = _stop(proc, sig, group=True)
        assert proc.returncode == 0, err[-3000:]
        assert f"received signal {int(sig)}" in err
        state = load_run_state(out / "checkpoint.pt")
        assert after <= state["global_step"] < CORPUS_STEPS
        assert state["global_step"] == max(logged_steps(out))  # the checkpoint is of the last step run
    proc = pretrain_corpus(corpus, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, corpus_reference)


def test_sigkill_at_each_point_of_a_checkpoint_write(tmp_path, corpus, corpus_reference):
    """SIGKILL while the temporary file is half written, when it is complete but not renamed, after
    the rename (folder not fsynced), and between the kept epoch copy and checkpoint.pt. Saves of
    this run: steps 2, 3 (epoch end), 4, 6 (epoch end), 8, 9 (epoch end)."""
    out = tmp_path / "run"
    plan = [  # (fault, checkpoint.pt step after the kill, a temporary file is left)
        (["mid_write", 2], 2, True),         # killed writing step 3's file: step 2 stays
        (["before_replace", 2], 3, True),    # resumed at 2; saves 3, dies renaming 4's complete file
        (["after_replace", 1], 4, False),    # resumed at 3; step 4 renamed, killed before the fsync
        (["link", 1], 4, False),             # resumed at 4; epoch copy of step 6 written, killed before linking
    ]
    for fault, expect, tmp_left in plan:
        proc = pretrain_corpus(corpus, out, faults={"kill": fault})
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-3000:])
        assert_every_checkpoint_loads(out)  # no visible checkpoint is ever truncated
        assert load_run_state(out / "checkpoint.pt")["global_step"] == expect, fault
        assert any(".tmp" in p.name for p in out.iterdir()) == tmp_left, fault  # the next run removes them
    assert load_run_state(out / "checkpoint-epoch2.pt")["global_step"] == 6  # written before the kill
    proc = pretrain_corpus(corpus, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, corpus_reference)  # the epoch-2 copy was rewritten, identical


def test_full_disk_and_file_size_limit(tmp_path, corpus, corpus_reference):
    """ENOSPC in the middle of a checkpoint write, then a real EFBIG from RLIMIT_FSIZE: each is
    reported with the checkpoint's path, leaves the previous checkpoint intact and no temporary
    file; the rerun without the fault ends as the uninterrupted run."""
    out = tmp_path / "run"
    proc = pretrain_corpus(corpus, out, faults={"enospc": 3})  # saves: 2, 3, [4 fails]
    assert proc.returncode != 0
    ckpt = out / "checkpoint.pt"
    assert f"could not write checkpoint {ckpt} (No space left on device)" in proc.stderr
    assert "previous checkpoint there, if any, is intact" in proc.stderr
    assert load_run_state(ckpt)["global_step"] == 3
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert "could not write checkpoint" in (out / "log.txt").read_text()

    size = ckpt.stat().st_size  # every checkpoint of this run has about this size
    # no worker here: its batches travel through shared-memory files, which the limit also caps
    proc = pretrain_corpus(corpus, out, "--set", "data.workers=0", faults={"fsize": size // 2})
    assert proc.returncode != 0
    assert f"could not write checkpoint {ckpt} (File too large)" in proc.stderr
    assert load_run_state(ckpt)["global_step"] == 3
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert all(p.name.startswith("checkpoint") for p in out.iterdir() if p.stat().st_size >= size // 2)  # only checkpoints are that big

    proc = pretrain_corpus(corpus, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, corpus_reference)


# --------------------------------------------------------------------------------------------
# torchrun: a rank dies, or only one rank is signalled
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def _rank_pids(agent_pid: int, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the worker processes that torchrun started (read from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != agent_pid:
                    continue
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except (OSError, ValueError, IndexError):
                continue
            if b"RANK" in env:
                found[int(env[b"RANK"])] = int(d)
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise AssertionError("torchrun's two worker processes did not appear")


TORCHRUN_SETTINGS = ["--set", "data.workers=0"]


@pytest.mark.slow
def test_torchrun_rank_signalled_alone_or_killed_then_resume(tmp_path, corpus):
    """2 processes (gloo, loopback). SIGUSR1 to rank 1 only: both ranks stop at the same step with a
    checkpoint and torchrun exits 0. SIGKILL of rank 1, then of rank 0: torchrun ends, non-zero, within
    a bounded time, and every checkpoint file loads. The resumed 2-process run ends exactly as an
    uninterrupted 2-process run, whose log names every bad file of both ranks."""
    ref = tmp_path / "ref"
    args = ["pretrain", "--data", corpus.root, "--out", ref, *CORPUS_SETTINGS, *TORCHRUN_SETTINGS]
    proc = subprocess.run(cli_cmd(*args, launcher=_torchrun()), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (ref / "log.txt").read_text(encoding="utf-8")
    for path, _ in corpus.bad.values():
        assert log.count(f"skipped {display(path)}: ") == 3, display(path)  # once per epoch, whichever rank
    assert load_run_state(ref / "checkpoint.pt")["skipped_files"] == 3 * len(corpus.bad)

    out = tmp_path / "run"
    args = ["pretrain", "--data", corpus.root, "--out", out, *CORPUS_SETTINGS, *TORCHRUN_SETTINGS]
    for action, rank, after in (("usr1", 1, 2), ("kill", 1, 4), ("kill", 0, 6)):
        proc = subprocess.Popen(cli_cmd(*args, launcher=_torchrun()), cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            pids = _rank_pids(proc.pid)
            wait_for_step(proc, out, after)
            assert proc.poll() is None, f"the run ended before step {after}"
            os.kill(pids[rank], signal.SIGUSR1 if action == "usr1" else signal.SIGKILL)
            t0 = time.time()
            _, err = proc.communicate(timeout=90)
            took = time.time() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if action == "usr1":
            assert proc.returncode == 0, err[-4000:]
            state = load_run_state(out / "checkpoint.pt")
            assert state["global_step"] == max(logged_steps(out)) < CORPUS_STEPS
            assert "received signal" in (out / "log.txt").read_text(encoding="utf-8")
        else:
            assert proc.returncode != 0, "torchrun reported success after a rank was killed"
            assert took < 60, f"torchrun took {took:.0f} s to end after rank {rank} died"
        assert_every_checkpoint_loads(out)
    proc = subprocess.run(cli_cmd(*args, launcher=_torchrun()), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(out, ref)

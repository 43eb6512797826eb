"""One writer per run folder (swav.runlock): a second process is refused at once with the holder's
process id and host, the lock dies with its holder (kill -9), a process does not lock out itself by
a second lock object, and a file system that cannot lock is refused loudly."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swav import runlock
from swav.runlock import LOCK_NAME, RunLock, RunLockedError, RunLockUnavailableError, read_holder

RUNLOCK_PY = Path(runlock.__file__)
# a process that holds the lock of argv[1] until killed: loads runlock.py alone (no torch: fast)
HOLDER = (
    "import importlib.util, sys, time\n"
    f"spec = importlib.util.spec_from_file_location('runlock', {str(RUNLOCK_PY)!r})\n"
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
    "m.RunLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def locked_elsewhere(folder: Path) -> bool:
    """Whether another process (a fresh one) finds the folder locked."""
    probe = HOLDER.replace("time.sleep(600)", "").replace("print('locked', flush=True)\n", "")
    proc = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True)
    return proc.returncode != 0 and "RunLockedError" in proc.stderr


def test_a_second_process_is_refused_with_the_holders_pid_and_host_until_the_holder_is_killed(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as ei:
            RunLock(tmp_path).acquire()
        msg = str(ei.value)
        assert f"process {holder.pid} on host {socket.gethostname()}" in msg and str(tmp_path) in msg
        assert ei.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path) as lock:  # nothing stale is left by kill -9
        assert lock.held and read_holder(tmp_path)["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: no record of a holder


def test_a_second_lock_in_the_same_process_is_refused_and_the_first_still_holds(tmp_path):
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunLockedError, match=f"process {os.getpid()} "):
            RunLock(tmp_path).acquire()
        assert first.held and locked_elsewhere(tmp_path)  # the refusal did not drop the first lock
    finally:
        first.release()
    assert not locked_elsewhere(tmp_path)
    first.release()  # idempotent


def test_a_record_left_by_a_dead_process_of_this_host_is_not_believed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(f'{{"pid": {int(dead.stdout)}, "host": "{socket.gethostname()}"}}')
    assert read_holder(tmp_path, wait=0.2)["pid"] == int(dead.stdout)  # (after waiting for a live record)
    with RunLock(tmp_path):  # and it does not block anyone
        pass


def test_a_file_system_that_cannot_lock_is_refused_with_what_to_do(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    with pytest.raises(RunLockUnavailableError, match="SWAV_RUN_LOCK=off"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SWAV_RUN_LOCK", "off")
    with RunLock(tmp_path) as lock:
        assert not lock.held


# ---------------------------------------------------------------------------------------------
# swav pretrain: two processes on one folder, kill -9, resume; a torchrun job on a folder in use
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
# a tiny model on 64 images, 2 steps per epoch, a checkpoint every epoch: runs until killed
LONG_RUN = ["--preset", "smoke", "--no-report", "--device", "cpu", "--set", "data.subset=64",
            "--set", "train.batch_size=32", "--set", "train.epochs=5000", "--set", "model.width_per_group=4",
            "--set", "model.hidden_mlp=16", "--set", "train.final_knn=false", "--set", "train.log_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain_cmd(out: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "swav.cli", "pretrain", "--out", str(out), "--set", f"data.root={root}",
            *LONG_RUN, *extra]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the first run ended early:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def steps_of(metrics: Path) -> list[int]:
    lines = metrics.read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@pytest.mark.slow
def test_second_pretrain_on_a_folder_in_use_exits_2_then_a_killed_run_resumes(tmp_path, fake_fmnist):
    out = tmp_path / "run"
    first = subprocess.Popen(pretrain_cmd(out, fake_fmnist), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "checkpoint.pt", first)
        # a half-written checkpoint of the live run (as it looks mid-save): a second writer must not remove it
        planted = out / ".checkpoint.pt.tmp.live"
        planted.write_bytes(b"half a checkpoint")
        config_stamp = (out / "config.yaml").stat().st_mtime_ns
        second = subprocess.run(pretrain_cmd(out, fake_fmnist), cwd=REPO, env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"in use by process {first.pid} on host {socket.gethostname()}" in err[0], err[0]
        # the first run's outputs are untouched
        assert planted.read_bytes() == b"half a checkpoint"
        assert (out / "config.yaml").stat().st_mtime_ns == config_stamp
        assert (out / "log.txt").read_text().count("steps/epoch") == 1  # one start: the first run's
        steps = steps_of(out / "metrics.jsonl")
        assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved records
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    done = steps_of(out / "metrics.jsonl")[-1]
    resumed = subprocess.run(pretrain_cmd(out, fake_fmnist, "--max-steps", "2"), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "resumed from" in log and log.count("steps/epoch") == 2
    assert not planted.exists()  # now the folder's writer clears what a killed process left
    steps = steps_of(out / "metrics.jsonl")
    assert steps[-1] >= max(done, 3)  # continued from its last checkpoint (at most one epoch back), not from 0


@pytest.mark.slow
def test_a_torchrun_job_on_a_folder_in_use_stops_on_every_rank(tmp_path, fake_fmnist):
    out = tmp_path / "run"
    out.mkdir()
    holder = start_holder(out)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "swav.cli", "pretrain", "--out", str(out),
               "--set", f"data.root={fake_fmnist}", *LONG_RUN]
        job = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    both = job.stdout + job.stderr
    assert job.returncode != 0
    assert both.count(f"swav pretrain: error: the run folder {str(out)!r} is in use by process {holder.pid}") == 2, \
        both[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written by either rank

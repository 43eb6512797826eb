"""One writer per run folder: the lock that ``swav pretrain`` (``swav.trainer.train``) holds on its
``--out`` folder from before it touches anything there until it ends.

How it works: the lock is an operating-system record lock (POSIX ``fcntl`` lock, ``F_SETLK``) on
the file ``RUN/.swav.lock``, taken without waiting. The kernel drops it when the holding process
ends, however it ends (``kill -9``, out of memory, a crashed node's lease expiring), so nothing
stale is ever left to clean. The file itself stays (removing a lock file races with a process
about to lock it); only its content changes: after taking the lock the holder writes a record into
it (process id, host, start time, command line) and empties it on release (a killed holder's record
stays until the next holder overwrites it, and blocks nothing). A second process that finds the
folder locked reads that record to say who holds it, and gives up at once (:class:`RunLockedError`,
a ValueError: ``swav`` exits 2).

Ranks of a ``torchrun`` / ``srun`` job: rank 0 takes the lock for the whole job (the caller
broadcasts the outcome so every rank starts or stops together); a second job on the same folder
fails on its rank 0.

What it guarantees, and where:

* one host, a local disk: two processes never hold it at once;
* NFS (v4, or v3 with ``lockd``, the Linux defaults): POSIX locks go to the server, so processes on
  different hosts exclude each other too; a client mounted with ``nolock`` or ``local_lock=posix``
  keeps locks on its own host only (two hosts could then both write one folder). The record names
  the host, so the message is right either way. The lock of a host that crashed is held by the
  server until that host's lease expires (NFSv4: about 90 s), then the folder is free;
* a file system that cannot lock (e.g. Lustre mounted without ``flock``/``localflock``) makes the
  lock fail with :class:`RunLockUnavailableError`, saying so; ``SWAV_RUN_LOCK=off`` runs without
  it (then nothing stops a second writer).

POSIX locks belong to a process and a file: they are not inherited by forked children (data
loader workers) and they are released if that process closes *any* descriptor of the lock file,
so nothing else in the holding process may open ``RUN/.swav.lock``. Two :class:`RunLock` objects
of one process on one folder also refuse each other (a table of the held locks of this process).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "RunLockUnavailableError", "read_holder", "ENV_SWITCH"]

LOCK_NAME = ".swav.lock"
ENV_SWITCH = "SWAV_RUN_LOCK"  # "off": run without the lock (file systems that cannot lock)
_BUSY = (errno.EACCES, errno.EAGAIN)  # what F_SETLK answers for a lock held elsewhere

_held: dict[tuple[int, int], "RunLock"] = {}  # (st_dev, st_ino) of lock files this process holds
_held_guard = threading.Lock()


class RunLockedError(ValueError):
    """The run folder is in use by another process (its record is in ``holder``)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class RunLockUnavailableError(ValueError):
    """The file system of the run folder cannot lock files (a folder that cannot be used: exit 2)."""


def read_holder(folder: str | os.PathLike, wait: float = 1.0) -> dict:
    """The record of the process that holds ``folder``'s lock (``{}`` when it has not written one).
    A holder writes it just after locking: an empty record, or one left by a process of this host
    that has ended, is read again for up to ``wait`` seconds."""
    path = Path(folder) / LOCK_NAME
    deadline = time.monotonic() + wait
    while True:
        try:
            text = path.read_text(encoding="utf-8")
            record = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        if (record and _alive(record)) or time.monotonic() >= deadline:
            return record
        time.sleep(0.05)


def _alive(record: dict) -> bool:
    """False only for a record of this host whose process is gone."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _describe(record: dict) -> str:
    if not record:
        return "another process (it has not written its process id yet)"
    started = record.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) \
        else ""
    return f"process {record.get('pid', '?')} on host {record.get('host', '?')}{when}"


class RunLock:
    """The lock of one run folder (created if needed). ``acquire()`` or ``with RunLock(folder):``.

    ``acquire`` raises :class:`RunLockedError` when another process holds it and
    :class:`RunLockUnavailableError` when the file system cannot lock; ``release`` (idempotent)
    empties the record and drops the lock. With ``SWAV_RUN_LOCK=off`` both do nothing.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "swav pretrain"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if os.environ.get(ENV_SWITCH, "").strip().lower() == "off" or self.held:
            return self
        with _held_guard:  # this process holds it already: refuse without opening the file (closing
            if self._held_key() in _held:  # a descriptor of it would drop this process's lock)
                raise self._locked({"pid": os.getpid(), "host": socket.gethostname()})
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                st = os.fstat(fd)
                self._lock(fd)
            except BaseException:
                os.close(fd)  # this process holds no lock on this file: closing drops nothing
                raise
            self._fd, self._key = fd, (st.st_dev, st.st_ino)
            _held[self._key] = self
        self._write_record()
        return self

    def _held_key(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _lock(self, fd: int) -> None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                raise self._locked(read_holder(self.folder)) from None
            raise RunLockUnavailableError(
                f"cannot lock the run folder {str(self.folder)!r} ({os.strerror(e.errno or 0)}): its "
                f"file system does not support file locks (a network file system mounted without them?); "
                f"use a run folder on a disk that does, or set {ENV_SWITCH}=off to run without the lock "
                "(then nothing stops a second run from writing the same folder)") from None

    def _locked(self, record: dict) -> RunLockedError:
        return RunLockedError(
            f"the run folder {str(self.folder)!r} is in use by {_describe(record)} (another {self.what}); "
            "wait for it to end or stop it, or give another --out; a run that was killed leaves no lock "
            "behind, so the same command resumes once that process is gone", record)

    def _write_record(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a record is only there while its writer holds the lock
        except OSError:
            pass
        finally:
            with _held_guard:
                _held.pop(self._key, None)
            os.close(fd)  # drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

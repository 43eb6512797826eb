"""Run the ``swav`` command with faults injected, for the reliability tests (not a test module).

    python tests/reliability/faultrun.py pretrain --preset smoke ...      (or under torchrun)

``SWAV_FAULTS`` (JSON) says what goes wrong in this process:

* ``{"unreadable": "NAME"}``: opening an image file whose name contains NAME fails with
  PermissionError, as for a file without read permission (the tests run as root, which reads
  anything);
* ``{"fsize": BYTES}``: RLIMIT_FSIZE, with SIGXFSZ ignored: a write past BYTES fails with EFBIG;
* ``{"kill": [POINT, K]}``: SIGKILL this process during its K-th checkpoint write (counted from 1):
  ``mid_write`` after the first KB of the temporary file, ``before_replace`` with the temporary
  file complete, ``after_replace`` before the folder is fsynced, ``link`` when the epoch copy is
  written and ``checkpoint.pt`` is about to become its second name;
* ``{"enospc": K}``: the K-th checkpoint write fails with ENOSPC after its first KB.

The injection wraps the product's functions from outside; nothing in ``swav`` knows about it.
"""
import errno
import json
import os
import resource
import signal
import sys

faults = json.loads(os.environ.get("SWAV_FAULTS") or "{}")
if "fsize" in faults:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(faults["fsize"]), int(faults["fsize"])))

import builtins  # noqa: E402

import swav.checkpoint as ckpt_mod  # noqa: E402
import swav.data.datasets as ds_mod  # noqa: E402
import swav.runstate as runstate_mod  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if "unreadable" in faults:
    marker = faults["unreadable"]

    def guarded_open(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and marker in os.path.basename(os.fsdecode(path)):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return builtins.open(path, *args, **kwargs)

    ds_mod.open = guarded_open

state = {"writes": 0, "armed": None}


class _FaultyFile:
    """A binary file whose writes, while armed, kill the process or fail with ENOSPC after 1 KB."""

    def __init__(self, f, action):
        self._f, self._action, self._written = f, action, 0

    def write(self, data):
        self._written += len(data)
        if self._written > 1024:
            if self._action == "mid_write":
                self._f.flush()
                die()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def faulty_open(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if state["armed"] in ("mid_write", "enospc") and "w" in mode:
        return _FaultyFile(f, state["armed"])
    return f


ckpt_mod.open = faulty_open
real_save, real_link, real_replace = ckpt_mod.save_atomic, ckpt_mod.link_atomic, os.replace
kill = faults.get("kill")


def counted_save(obj, path):
    state["writes"] += 1
    if kill and kill[0] in ("mid_write", "before_replace", "after_replace") and state["writes"] == kill[1]:
        state["armed"] = kill[0]
    if faults.get("enospc") == state["writes"]:
        state["armed"] = "enospc"
    try:
        real_save(obj, path)
    finally:
        state["armed"] = None


def faulty_replace(src, dst, *args, **kwargs):
    if state["armed"] == "before_replace":
        die()
    real_replace(src, dst, *args, **kwargs)
    if state["armed"] == "after_replace":
        die()


def counted_link(src, dst):
    if kill and kill[0] == "link" and state["writes"] >= kill[1]:
        die()
    real_link(src, dst)


os.replace = faulty_replace
runstate_mod.save_atomic = counted_save
runstate_mod.link_atomic = counted_link

if __name__ == "__main__":
    from swav.cli import entry

    entry(sys.argv[1:])

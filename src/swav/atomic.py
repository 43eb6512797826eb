"""Writing a file so that it is always either its old or its complete new content."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, IO

__all__ = ["write_atomic", "write_text_atomic", "write_bytes_atomic", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is fsynced before the rename and the folder after it (``durable``); on any
    failure (full disk, interrupt, an exception of ``write``) it is removed and ``path`` keeps its
    previous content. The exception is re-raised unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    return write_atomic(path, lambda f: f.write(data), durable=durable)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable)

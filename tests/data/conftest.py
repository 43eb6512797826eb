"""Fixtures for the data tests: every file is generated under tmp_path."""

from __future__ import annotations

import gzip
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_rgb(path: Path, w: int, h: int, color=(10, 20, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path, format=fmt)
    return path


def save_noise(path: Path, w: int, h: int, seed: int = 0, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A tiny PNG whose IHDR declares a huge 8-bit grey image."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 12, n_test: int = 5, compress: bool = True, seed: int = 0):
    """Write the four Fashion-MNIST idx files; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[split] = (images, labels)
    return out


@pytest.fixture
def util():
    return types.SimpleNamespace(
        save_rgb=save_rgb,
        save_noise=save_noise,
        png_bomb=png_bomb,
        idx_bytes=idx_bytes,
        write_fashion_mnist=write_fashion_mnist,
    )


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """No real data set is visible: HOME and SWAV_DATA point into tmp_path and
    the system locations are empty. Returns the SWAV_DATA folder."""
    from swav.data import builtin

    home = tmp_path / "home"
    home.mkdir()
    data = tmp_path / "swav_data"
    data.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SWAV_DATA", str(data))
    for name in builtin.BUILTIN_NAMES:
        monkeypatch.setitem(builtin.SYSTEM_DIRS, name, ())
    return data

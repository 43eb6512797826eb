"""Shared pieces of the reliability tests: the bad-input corpus, the CLI run helpers (through
``faultrun.py``, which injects faults from outside the product) and exact state comparisons."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav.checkpoint import load_run_state

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("faultrun.py")
UNREADABLE = "unreadable"  # files whose name holds this cannot be opened (simulated: we run as root)

# pretraining on the corpus: 48 files, 16 per step -> 3 steps per epoch, every file tried each epoch
CORPUS_SETTINGS = [
    "--preset", "smoke", "--set", "model.in_chans=3", "--set", "augment.mean=[0.5,0.5,0.5]",
    "--set", "augment.std=[0.25,0.25,0.25]", "--set", "data.subset=0", "--set", "data.workers=1",
    "--set", "train.batch_size=16", "--set", "train.epochs=3", "--set", "swav.queue_length=32",
    "--set", "swav.epoch_queue_starts=1", "--set", "train.save_every_steps=2",
]
CORPUS_EPOCHS, CORPUS_STEPS = 3, 9


# --------------------------------------------------------------------------------------------
# the bad-input corpus
# --------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_size_png(w: int, h: int) -> bytes:
    """A few hundred bytes of PNG whose header declares a w x h RGB image."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _png_chunk(b"IEND", b""))


def declared_size_jpeg(w: int, h: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def display(path: str | bytes) -> str:
    """How a log names ``path``: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def write_corpus(folder: Path) -> types.SimpleNamespace:
    """One file of each bad kind (9), each awkward-but-valid kind (9) and 30 plain images.

    Returns ``root``, ``bad`` {file name: (path, reason fragment)}, ``good`` [paths]."""
    folder.mkdir(parents=True, exist_ok=True)
    root = os.fsencode(folder)
    bad: dict[str, tuple[str, str]] = {}
    good: list[str] = []

    def put(name: bytes, data: bytes) -> str:
        p = os.path.join(root, name)
        with open(p, "wb") as f:
            f.write(data)
        return os.fsdecode(p)

    # -- bad: each must be skipped, with a reason
    jpg, png = image_bytes(noise(32, 32, 1), "JPEG"), image_bytes(noise(32, 32, 2), "PNG")
    bad["trunc.jpg"] = (put(b"trunc.jpg", jpg[: len(jpg) // 2]), "cannot decode")
    bad["trunc.png"] = (put(b"trunc.png", png[: len(png) // 2]), "cannot decode")
    bad["zero.jpg"] = (put(b"zero.jpg", b""), "empty file")
    bad["text.jpg"] = (put(b"text.jpg", b"I am a text file, not a JPEG\n" * 4), "not an image")
    bad["bomb60k.png"] = (put(b"bomb60k.png", declared_size_png(60000, 60000)), "decompression bomb")
    bad["bomb60k.jpg"] = (put(b"bomb60k.jpg", declared_size_jpeg(60000, 60000)), "decompression bomb")
    link = os.path.join(root, b"broken.png")
    os.symlink(os.path.join(root, b"no-such-target.png"), link)
    bad["broken.png"] = (os.fsdecode(link), "broken symlink")
    unreadable = put(UNREADABLE.encode() + b".png", png)
    os.chmod(unreadable, 0)
    bad[UNREADABLE + ".png"] = (unreadable, "permission denied")
    bad["trunc_\\xff.jpg"] = (put(b"trunc_\xff.jpg", jpg[: len(jpg) // 3]), "cannot decode")  # not UTF-8

    # -- awkward but valid: each must be used
    good.append(put(b"one_px.png", image_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")))
    good.append(put(b"thin_wide.png", image_bytes(noise(300, 1, 3), "PNG")))
    good.append(put(b"thin_tall.png", image_bytes(noise(1, 200, 4), "PNG")))
    good.append(put(b"cmyk.jpg", image_bytes(Image.new("CMYK", (24, 20), (10, 200, 30, 5)), "JPEG")))
    g16 = (np.arange(30 * 26, dtype=np.uint16).reshape(26, 30) * 83).astype(np.uint16)
    good.append(put(b"gray16.png", image_bytes(Image.fromarray(g16), "PNG")))
    pal = Image.new("P", (20, 20))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putdata([(i // 7) % 2 for i in range(400)])
    good.append(put(b"palette_transparent.png", image_bytes(pal, "PNG", transparency=1)))
    frames = [Image.new("RGB", (22, 18), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    good.append(put(b"animated.gif", image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                                  duration=40, loop=0)))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    good.append(put(b"exif_rotated.jpg", image_bytes(noise(40, 20, 5), "JPEG", exif=exif.tobytes())))
    good.append(put(b"good_caf\xe9.png", image_bytes(noise(25, 25, 6), "PNG")))  # latin-1 name: not UTF-8
    # -- plain images
    for i in range(30):
        w, h = 20 + (i * 7) % 21, 20 + (i * 11) % 21
        fmt = "PNG" if i % 2 else "JPEG"
        good.append(put(f"img{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}".encode(), image_bytes(noise(w, h, 100 + i), fmt)))
    return types.SimpleNamespace(root=os.fsdecode(root), bad=bad, good=good, n=len(bad) + len(good))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> types.SimpleNamespace:
    c = write_corpus(tmp_path_factory.mktemp("corpus") / "images")
    assert c.n == 48 and len(c.bad) == 9
    return c


# --------------------------------------------------------------------------------------------
# running the CLI
# --------------------------------------------------------------------------------------------
def cli_cmd(*args, launcher=None) -> list[str]:
    return [*(launcher or [sys.executable]), str(DRIVER), *map(str, args)]


def cli_env(faults: dict | None = None) -> dict:
    f = {"unreadable": UNREADABLE, **(faults or {})}
    return {**os.environ, "OMP_NUM_THREADS": "1", "SWAV_FAULTS": json.dumps(f)}


def run_cli(*args, faults=None, timeout=300, launcher=None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args, launcher=launcher), cwd=REPO, env=cli_env(faults), capture_output=True,
                          text=True, timeout=timeout)


def start_cli(*args, faults=None, launcher=None) -> subprocess.Popen:
    """In its own session, so that a signal can go to the whole process group (as SLURM does)."""
    return subprocess.Popen(cli_cmd(*args, launcher=launcher), cwd=REPO, env=cli_env(faults),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def pretrain_corpus(corpus, out, *extra, **kw):
    return run_cli("pretrain", "--data", corpus.root, "--out", out, *CORPUS_SETTINGS, *extra, **kw)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl has a line for ``step`` (or the process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if max(logged_steps(out), default=0) >= step:
            return
        time.sleep(0.005)


def logged_steps(out: Path) -> list[int]:
    try:
        text = (Path(out) / "metrics.jsonl").read_text()
    except OSError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def metrics(out: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run writes the steps after its checkpoint again)."""
    return {r["step"]: r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


# --------------------------------------------------------------------------------------------
# comparing run states
# --------------------------------------------------------------------------------------------
def assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: type/shape"
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            raise AssertionError(f"{where} differs (max abs difference {d})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(got: Path, ref: Path) -> None:
    """Same losses at every step, same final state (weights, BN buffers, optimizer, queue,
    counters), the same kept epoch copies, and no file left half-written."""
    got, ref = Path(got), Path(ref)
    ma, mb = metrics(got), metrics(ref)
    assert ma.keys() == mb.keys()
    differ = [s for s in sorted(ma) if (ma[s]["loss"], ma[s]["skipped_files"]) != (mb[s]["loss"], mb[s]["skipped_files"])]
    assert not differ, f"steps {differ} differ, first: {ma[differ[0]]} vs {mb[differ[0]]}"
    a, b = load_run_state(got / "checkpoint.pt"), load_run_state(ref / "checkpoint.pt")
    for key in ("global_step", "epochs", "model", "optimizer", "queue", "skipped_files", "nonfinite_steps"):
        assert_same_tensors(a[key], b[key], key)
    kept = sorted(p.name for p in ref.glob("checkpoint-epoch*.pt"))
    assert sorted(p.name for p in got.glob("checkpoint-epoch*.pt")) == kept
    for name in kept:
        assert_same_tensors(load_run_state(got / name)["model"], load_run_state(ref / name)["model"], name)
    assert not [p.name for p in got.iterdir() if ".tmp" in p.name], "a temporary file was left behind"


def assert_every_checkpoint_loads(out: Path) -> None:
    for ck in Path(out).glob("checkpoint*.pt"):
        load_run_state(ck)


@pytest.fixture(scope="session")
def corpus_reference(tmp_path_factory, corpus) -> Path:
    """An uninterrupted pretraining run on the corpus, through the CLI (one process)."""
    out = tmp_path_factory.mktemp("corpus_ref") / "run"
    proc = pretrain_corpus(corpus, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out

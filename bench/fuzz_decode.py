"""Fuzz the image decoding path: random bytes and mutated valid images through
``swav.data.datasets.decode_image`` and ``ImageFilesDataset.__getitem__``.

The contract under test: for any file, ``decode_image`` returns a uint8 tensor (C, H, W) with
C = in_chans, H, W >= 1 (and max(H, W) <= max_side when set), or raises ``BadImageError`` with a
reason; ``__getitem__`` returns an image or a ``Skipped`` record; nothing else ever escapes, and
no input takes long. Anything else is a finding: it is counted, printed, and its input is kept.

    python bench/fuzz_decode.py                       # 5 minutes
    python bench/fuzz_decode.py --n 50000 --seed 1    # a fixed number of inputs
    python bench/fuzz_decode.py --seconds 30 --out /tmp/fuzz

The short version runs in the test suite (tests/reliability/test_fuzz_decode.py).
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import random
import signal
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from swav.data.datasets import BadImageError, ImageFilesDataset, Skipped, decode_image

SLOW_SECONDS = 5.0  # an input taking longer than this is a finding


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` in the decoder hides it."""


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def seed_images(rng: random.Random) -> list[bytes]:
    """Valid files of many formats and modes, small enough to mutate quickly."""
    out = []
    nrng = np.random.default_rng(rng.randrange(2**32))

    def noise(w, h, c=3):
        return nrng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    for w, h in ((1, 1), (17, 9), (40, 32), (3, 64)):
        rgb = Image.fromarray(noise(w, h))
        out.append(_encode(rgb, "PNG"))
        out.append(_encode(rgb, "JPEG", quality=80))
        out.append(_encode(rgb, "JPEG", progressive=True))
        out.append(_encode(rgb, "BMP"))
        out.append(_encode(rgb, "TIFF", compression="tiff_deflate"))
        out.append(_encode(rgb, "TIFF"))
        out.append(_encode(rgb, "WEBP"))
        out.append(_encode(rgb, "PPM"))
        out.append(_encode(Image.fromarray(noise(w, h, 1)), "PNG"))
        out.append(_encode(Image.fromarray(noise(w, h, 4), "RGBA"), "PNG"))
        out.append(_encode(Image.fromarray((noise(w, h, 1).astype(np.uint16) * 257)), "PNG"))
        out.append(_encode(rgb.convert("CMYK"), "JPEG"))
        pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        out.append(_encode(pal, "PNG", transparency=0))
        frames = [Image.fromarray(noise(w, h)).convert("P") for _ in range(3)]
        out.append(_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=30, loop=0))
        exif = Image.Exif()
        exif[0x0112] = rng.choice([1, 3, 6, 8])
        out.append(_encode(rgb, "JPEG", exif=exif.tobytes()))
    return out


_MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*",
           b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"\x00\x00\x01\x00"]


def _set_dimensions(data: bytearray, rng: random.Random) -> None:
    """Overwrite the declared size fields of the formats we know with extreme values."""
    big = rng.choice([0, 1, 2**15, 2**16 - 1, 60000, 2**31 - 1, 2**32 - 1])
    other = rng.choice([0, 1, 7, 60000, 2**16 - 1])
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        data[16:24] = struct.pack(">II", big & 0xFFFFFFFF, other)
    elif data.startswith(b"GIF") and len(data) >= 10:
        data[6:10] = struct.pack("<HH", big & 0xFFFF, other & 0xFFFF)
    elif data.startswith(b"BM") and len(data) >= 26:
        data[18:26] = struct.pack("<iI", (big & 0x7FFFFFFF) * rng.choice([1, -1]), other)
    elif data.startswith(b"\xff\xd8"):
        sof = data.find(b"\xff\xc0")
        if sof < 0:
            sof = data.find(b"\xff\xc2")
        if 0 <= sof and sof + 9 <= len(data):
            data[sof + 5:sof + 9] = struct.pack(">HH", big & 0xFFFF, other & 0xFFFF)


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    d = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        op = rng.randrange(8)
        if not d:
            d = bytearray(rng.randbytes(rng.randrange(1, 64)))
        if op == 0:  # flip bits
            for _ in range(rng.randrange(1, 9)):
                i = rng.randrange(len(d))
                d[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # overwrite bytes with interesting values
            for _ in range(rng.randrange(1, 5)):
                i = rng.randrange(len(d))
                d[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == 2:  # truncate
            d = d[: rng.randrange(len(d) + 1)]
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(d) + 1)
            d[i:i] = rng.randbytes(rng.randrange(1, 256))
        elif op == 4:  # delete a block
            i = rng.randrange(len(d))
            del d[i:i + rng.randrange(1, 256)]
        elif op == 5:  # duplicate a block
            i = rng.randrange(len(d))
            j = min(len(d), i + rng.randrange(1, 512))
            d[j:j] = d[i:j]
        elif op == 6:  # splice with another seed
            other = rng.choice(seeds)
            d = d[: rng.randrange(len(d) + 1)] + bytearray(other[rng.randrange(len(other) + 1):])
        else:
            _set_dimensions(d, rng)
    return bytes(d)


def make_input(rng: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    r = rng.random()
    if r < 0.10:
        return "random bytes", rng.randbytes(rng.choice([0, 1, 2, 7, 64, 1000, 5000]))
    if r < 0.20:
        return "magic + random", rng.choice(_MAGICS) + rng.randbytes(rng.randrange(0, 3000))
    if r < 0.25:
        return "valid", rng.choice(seeds)
    return "mutated", mutate(rng.choice(seeds), rng, seeds)


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def _reason_class(reason: str) -> str:
    if reason.startswith("cannot decode: "):
        return "cannot decode: " + reason[len("cannot decode: "):].split(":")[0]
    return reason.split(":")[0].split("(")[0].strip()


def check(path: str, rng: random.Random) -> tuple[str, str | None]:
    """(outcome, problem or None) of one file through decode_image and __getitem__."""
    in_chans = rng.choice([1, 3])
    min_size = rng.choice([0, 0, 2, 16])
    max_side = rng.choice([0, 0, 8, 100])
    max_pixels = rng.choice([2**26, 2**26, 10_000])
    mean_side = rng.choice([0, 0, 6, 60])
    opts = dict(in_chans=in_chans, min_size=min_size, max_side=max_side, mean_side=mean_side, max_pixels=max_pixels)
    try:
        img = decode_image(path, **opts)
    except BadImageError as e:
        outcome, img = "skip: " + _reason_class(str(e)), None
    except _Timeout:
        raise
    except BaseException as e:  # noqa: BLE001 - anything else is the finding
        return "ESCAPED " + type(e).__name__, f"decode_image raised {type(e).__name__}: {e}"
    else:
        outcome = "image"
        c, h, w = img.shape
        if img.dtype.is_floating_point or str(img.dtype) != "torch.uint8":
            return "BAD OUTPUT", f"dtype {img.dtype}"
        if c != in_chans or h < 1 or w < 1 or (max_side and max(h, w) > max_side) or \
                (mean_side and h * w > 1.02 * (mean_side + 1) ** 2 and min(h, w) > 1) or \
                (min_size and min(h, w) < min_size and not (max_side or mean_side)):
            return "BAD OUTPUT", f"shape {tuple(img.shape)} for {opts}"
    try:
        item = ImageFilesDataset([path], **opts)[0]
    except _Timeout:
        raise
    except BaseException as e:  # noqa: BLE001
        return "ESCAPED " + type(e).__name__, f"__getitem__ raised {type(e).__name__}: {e}"
    if isinstance(item, Skipped) != (img is None):
        return "INCONSISTENT", f"decode_image gave {outcome}, __getitem__ gave {type(item).__name__}"
    return outcome, None


def run(n: int | None = None, seconds: float | None = None, seed: int = 0, out: str | None = None,
        progress: bool = False) -> dict:
    """Fuzz until ``n`` inputs or ``seconds`` have passed. Returns counts, findings, slowest, rate."""
    rng = random.Random(seed)
    seeds = seed_images(rng)
    tmp = tempfile.TemporaryDirectory(prefix="swav-fuzz-")
    work = Path(tmp.name)
    keep = Path(out) if out else work / "findings"
    counts: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    findings: list[str] = []
    slowest: list[tuple[float, str, str]] = []
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Timeout()))
    t0 = last = time.perf_counter()
    i = 0
    try:
        while (n is None or i < n) and (seconds is None or time.perf_counter() - t0 < seconds):
            kind, data = make_input(rng, seeds)
            path = work / f"input{i % 8}.img"
            path.write_bytes(data)
            opts_rng = random.Random(rng.randrange(2**32))
            signal.setitimer(signal.ITIMER_REAL, 4 * SLOW_SECONDS)
            t = time.perf_counter()
            try:
                outcome, problem = check(str(path), opts_rng)
            except _Timeout:
                outcome, problem = "TIMEOUT", f"over {4 * SLOW_SECONDS:.0f} s"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            dt = time.perf_counter() - t
            if dt > SLOW_SECONDS and problem is None:
                outcome, problem = "SLOW", f"{dt:.1f} s"
            counts[outcome] += 1
            kinds[kind] += 1
            slowest = sorted(slowest + [(dt, kind, outcome)], reverse=True)[:5]
            if problem is not None:
                keep.mkdir(parents=True, exist_ok=True)
                saved = keep / f"finding{len(findings):03d}-{i}.bin"
                saved.write_bytes(data)
                findings.append(f"input {i} ({kind}): {outcome}: {problem} [saved as {saved}]")
            i += 1
            if progress and time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(f"  {i} inputs, {len(findings)} findings, {i / (last - t0):.0f}/s", file=sys.stderr)
    finally:
        signal.signal(signal.SIGALRM, old)
        if not findings:
            tmp.cleanup()
    elapsed = time.perf_counter() - t0
    return {"inputs": i, "seconds": elapsed, "rate": i / max(elapsed, 1e-9), "counts": dict(counts),
            "kinds": dict(kinds), "findings": findings, "slowest": slowest, "seed": seed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="number of inputs (default: until --seconds)")
    p.add_argument("--seconds", type=float, default=None, help="time limit (default 300 when --n is not given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for inputs that produced a finding")
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else (None if a.n else 300.0)
    import PIL
    import torch

    print(f"fuzzing decode_image: seed {a.seed}, " + (f"{a.n} inputs" if a.n else f"{seconds:.0f} s")
          + f" (Pillow {PIL.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]})")
    r = run(n=a.n, seconds=seconds, seed=a.seed, out=a.out, progress=True)
    print(f"{r['inputs']} inputs in {r['seconds']:.0f} s ({r['rate']:.0f}/s); kinds: "
          + ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items())))
    print("outcomes:")
    for k, v in sorted(r["counts"].items(), key=lambda kv: -kv[1]):
        print(f"  {v:7d}  {k}")
    print("slowest: " + "; ".join(f"{dt * 1000:.0f} ms ({kind}, {outcome})" for dt, kind, outcome in r["slowest"]))
    print(f"findings: {len(r['findings'])}")
    for f in r["findings"][:50]:
        print("  " + f)
    return 1 if r["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())

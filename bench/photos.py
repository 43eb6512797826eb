"""Photo-like JPEGs for the data-path benchmarks and tests: smooth colour fields with texture and
a little grain, not noise (noise would make every JPEG as large as a raw image and decode far
slower than a photo). At 4000x3000 and quality 90 a file is about 3.3 MB, as a 12-MP phone photo.

    from photos import photo_like, write_photos
    write_photos("photos/", n=64, size=(640, 480))            # photos/img0000.jpg ...

Used by bench/bench_loader.py, bench/gpu_check.py and the tests (imported by path).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["photo_like", "write_photos"]


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """An RGB image of ``w x h``: a bicubic colour field from an 8x6 grid of random colours, a
    grey texture of about 3-pixel features at +-25 levels, and +-6 levels of grain."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    small = rng.integers(0, 256, (max(2, h // 3), max(2, w // 3)), dtype=np.uint8)
    texture = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    a = np.asarray(base, dtype=np.int16) + ((np.asarray(texture, dtype=np.int16) - 128) // 5)[..., None]
    a += rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def write_photos(folder: str | os.PathLike, n: int, size: tuple[int, int], *, seed: int = 0, quality: int = 90,
                 start: int = 0) -> list[Path]:
    """``n`` JPEGs ``img{start+i:04d}.jpg`` of ``size`` (w, h) in ``folder`` (kept when already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            photo_like(*size, seed=seed + i).save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths

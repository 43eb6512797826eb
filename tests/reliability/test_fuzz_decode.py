"""A short run of bench/fuzz_decode.py (random bytes, mutated PNG/JPEG/GIF/BMP/TIFF/WebP/PPM files
with extreme declared sizes): decode_image returns an image or raises BadImageError, the dataset
returns an image or a Skipped record, nothing else escapes and no input is slow. The long run is
``python bench/fuzz_decode.py`` (5 minutes)."""
from __future__ import annotations

import importlib.util
import random

import torch

from swav.data.datasets import ImageFilesDataset, Skipped
from swav.data.loader import EpochLoader

from .conftest import REPO

_spec = importlib.util.spec_from_file_location("fuzz_decode", REPO / "bench" / "fuzz_decode.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def test_fuzz_decode_short_run():
    result = fuzz.run(n=600, seed=0)
    assert not result["findings"], "\n".join(result["findings"])
    counts = result["counts"]
    assert counts.get("image", 0) > 30  # the fuzzer reaches the decoders, not only the format check
    assert sum(v for k, v in counts.items() if k.startswith("skip: cannot decode")) > 30
    assert counts.get("skip: decompression bomb", 0) > 0


def test_fuzzed_files_through_loader_workers(tmp_path):
    """Fuzzed files decoded by two data-loader worker processes: every batch arrives."""
    rng = random.Random(1)
    seeds = fuzz.seed_images(rng)
    paths = []
    for i in range(96):
        _, data = fuzz.make_input(rng, seeds)
        p = tmp_path / f"f{i:03d}.png"
        p.write_bytes(data)
        paths.append(p)
    ds = ImageFilesDataset(paths, in_chans=3, max_side=64)
    got = list(EpochLoader(ds, 16, seed=0, epoch=0, shuffle=False, workers=2))
    assert len(got) == 6
    assert sum(len(b) + len(b.skipped) for b in got) == 96
    assert all(isinstance(s, Skipped) and s.reason for b in got for s in b.skipped)
    assert all(b.images.dtype == torch.uint8 for b in got if len(b))

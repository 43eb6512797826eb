"""Benchmark: how long ``ImageFolderDataset`` takes to list a folder of many files.

    python bench/bench_listing.py [--files 10000 100000] [--repeats 3]

Creates zero-byte ``.jpg`` entries in a temporary folder (two class sub-folders), lists it with
``ImageFolderDataset`` several times, and prints the best and median seconds and files per second,
with the CPU it ran on. The tests check what the listing returns; its speed is measured here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from swav.data.datasets import ImageFolderDataset
from swav.device import cpu_name


def make_folder(root: Path, n: int) -> None:
    for c in ("a", "b"):
        d = root / c
        d.mkdir(parents=True)
        fd = os.open(d, os.O_RDONLY)
        try:
            for i in range(n // 2):
                os.close(os.open(f"{i:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    for n in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            make_folder(Path(tmp), n)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ds = ImageFolderDataset(tmp)
                times.append(time.perf_counter() - t0)
                assert len(ds) == n // 2 * 2
            best, med = min(times), statistics.median(times)
            print(f"{n:>8} files: best {best:.3f} s, median {med:.3f} s ({n / best:,.0f} files/s)")


if __name__ == "__main__":
    main()

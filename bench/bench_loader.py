"""Benchmark: the training loader alone, one worker, images/s, before and after issue 22 side by side.

    python bench/bench_loader.py [--dir /tmp/swav-photos] [--quick] [--json out.json]

Generates photo-like JPEGs (bench/photos.py: colour fields with texture, quality 90) once in
``--dir``: 12 MP (4000x3000, ~3.3 MB), 640x480 and 500x375; runs ``swav prepare`` on the 12-MP
folder; then times, each in its own process and in turn (2 rounds, best of each):

* ``before``: the code before issue 22 (bench/before.py: a git worktree of that commit) with its
  defaults: full-size decode, collate padding to the largest image;
* ``after, max_side=0``: this code decoding at full size (the official decode);
* ``after``: this code with its defaults (``data.max_side=auto``: the decode size of the paper's
  2x224 + 6x96 crops, geometric-mean side 692 px);
* ``after, prepared``: the defaults on ``swav prepare``'s output of the 12-MP folder.

What is timed: the best of two epochs (after a first one that starts the worker and fills the page
cache) of an ``EpochLoader`` (persistent worker, batches of 16, 1 worker, no shuffle) over a file
list naming the folder's files repeatedly (512 entries; 32 for the raw 12-MP photos): decode in
the worker, collate, the batch handed to the main process.
It also times ``swav prepare`` itself (1 and 2 workers), the one-time cost that prepared folders pay.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from before import before_src  # noqa: E402
from photos import write_photos  # noqa: E402

REPO = HERE.parent
CHILD = r"""
import json, sys, time
from swav.data.datasets import FileListDataset
from swav.data.loader import EpochLoader
listed, opts, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
ds = FileListDataset(listed, **opts)
loader = EpochLoader(ds, batch, seed=0, epoch=0, shuffle=False, workers=1, drop_last=False)
best = 0.0
for epoch in range(3):  # epoch 0 starts the worker and warms the page cache
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n, shape = 0, None
    for b in loader:
        n, shape = n + len(b), list(b.images.shape)
    dt = time.perf_counter() - t0
    if epoch:
        best = max(best, n / dt)
print(json.dumps({"images_per_s": best, "images": n, "shape": shape}))
"""


def _long_list(folder: Path, at_least: int) -> Path:
    """A file list naming the folder's images repeatedly, ``at_least`` entries: epochs long enough
    that the loader's start at each epoch does not count (the files stay in the page cache)."""
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    times = -(-at_least // len(files))
    path = folder.parent / f"{folder.name}-x{times}.txt"
    path.write_text("".join(f + "\n" for _ in range(times) for f in files))
    return path


def _loader_rate(src: Path, folder: Path, opts: dict, batch: int = 16) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    big = folder.name.startswith("p12mp") and "prep" not in folder.name
    listed = _long_list(folder, 32 if big else 512)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(listed), json.dumps(opts), str(batch)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"loader run failed ({src}, {folder}, {opts}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prepare(src_folder: Path, out: Path, workers: int, quality: int = 90) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "swav.cli", "prepare", str(src_folder), "--out", str(out), "--workers",
                    str(workers), "--quality", str(quality)], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/swav-photos", help="where the generated folders are kept")
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run of the script)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--lower-quality", type=int, nargs="*", default=[85, 80],
                    help="also time swav prepare's output at these JPEG qualities (default 85 80)")
    args = ap.parse_args()
    base = Path(args.dir)
    n_big, n_small = (8, 32) if args.quick else (32, 256)
    folders = {"12 MP (4000x3000)": (base / f"p12mp-{n_big}", (4000, 3000), n_big),
               "640x480": (base / f"p640-{n_small}", (640, 480), n_small),
               "500x375": (base / f"p500-{n_small}", (500, 375), n_small)}
    for folder, size, n in folders.values():
        write_photos(folder, n, size)
    sys.path.insert(0, str(REPO / "src"))
    from swav.build import decode_options
    from swav.config import make_config

    auto = decode_options(make_config(None))
    prepared = base / f"p12mp-{n_big}-prepared"
    prep_times = {}
    for w in (1, 2):
        out = base / f"p12mp-{n_big}-prep{w}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        prep_times[w] = _prepare(folders["12 MP (4000x3000)"][0], out, w)
    if not prepared.exists():
        os.rename(base / f"p12mp-{n_big}-prep2", prepared)
    lower = {q: base / f"p12mp-{n_big}-prepared-q{q}" for q in args.lower_quality}
    for q, out in lower.items():
        if not out.exists():
            _prepare(folders["12 MP (4000x3000)"][0], out, 2, q)
    old, new = before_src(), REPO / "src"
    configs = [("before (full decode, pad to largest)", old, {"in_chans": 3}),
               ("after, data.max_side=0", new, {**auto, "max_side": 0, "mean_side": 0}),
               ("after, defaults (auto)", new, auto)]
    rows = {}
    for r in range(args.rounds):
        for name, (folder, _, _) in folders.items():
            for label, src, opts in configs:
                res = _loader_rate(src, folder, opts)
                key = (name, label)
                rows[key] = max(rows.get(key, {"images_per_s": 0}), res, key=lambda d: d["images_per_s"])
        for label, folder in [("", prepared)] + [(f" (--quality {q})", f) for q, f in lower.items()]:
            res = _loader_rate(new, folder, auto)
            key = ("12 MP, swav prepare's output" + label, "after, defaults (auto)")
            rows[key] = max(rows.get(key, {"images_per_s": 0}), res, key=lambda d: d["images_per_s"])
    n = folders["12 MP (4000x3000)"][2]
    print(f"loader, 1 worker, batches of 16, best of {args.rounds} rounds ({os.cpu_count()} CPUs)")
    for (name, label), res in rows.items():
        print(f"  {name:30s} {label:40s} {res['images_per_s']:8.1f} images/s   batch {res['shape']}")
    for w, t in prep_times.items():
        print(f"  swav prepare of {n} 12-MP photos, {w} worker(s): {t:.1f} s ({n / t:.1f} images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"loader": {f"{a} | {b}": v for (a, b), v in rows.items()},
                                               "prepare_seconds": prep_times, "decode": auto}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark: issue 22's one-step run, with and without one 48-MP photo among 640x480 ones.

    python bench/bench_one_step.py [--dir /tmp/swav-photos] [--with-old-48mp]

64 photo-like 640x480 JPEGs (bench/photos.py), and the same folder with one photo replaced by an
8000x6000 one (48 MP, as phones shoot); each trained for one step with

    swav pretrain --preset imagenet-bs256 --data FOLDER --batch-size 64 --device cpu --epochs 1
        --set model.arch=resnet18 --set model.width_per_group=8
        --set augment.size_crops=[96,48] --set augment.nmb_crops=[2,2] --no-report

by this code (defaults: decode at the crops' size) and by the code before issue 22
(bench/before.py), each in a fresh process. Prints the wall time of the command and two peak
memories: the command's own process (``ru_maxrss``, as /usr/bin/time reports it) and its whole
process tree (the data-loader workers and their shared memory included), the largest sum of the
tree's resident set sizes seen, sampled every 20 ms. The old code on the 48-MP folder is not run
unless ``--with-old-48mp``: it pads the batch to 64 x 3 x 6000 x 8000 and needs more than 24 GB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from before import before_src  # noqa: E402
from photos import photo_like, write_photos  # noqa: E402

REPO = HERE.parent
SETTINGS = ["--preset", "imagenet-bs256", "--batch-size", "64", "--device", "cpu", "--epochs", "1",
            "--set", "model.arch=resnet18", "--set", "model.width_per_group=8",
            "--set", "augment.size_crops=[96,48]", "--set", "augment.nmb_crops=[2,2]", "--no-report"]


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_once(src: Path, folder: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="swav-one-step-"))
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "swav.cli", "pretrain", "--data", str(folder), "--out", str(out / "run"), *SETTINGS]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        return {"exit": proc.returncode, "wall_s": wall, "error": err.strip().splitlines()[-1:]}
    return {"exit": 0, "wall_s": wall, "peak_rss_main_gb": usage.ru_maxrss / 2**20, "peak_tree_gb": peak[0] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/swav-photos")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--with-old-48mp", action="store_true", help="also run the old code on the 48-MP folder")
    args = ap.parse_args()
    base = Path(args.dir)
    plain = base / "one-step-640"
    write_photos(plain, 64, (640, 480))
    big = base / "one-step-640-48mp"
    if not big.exists():
        shutil.copytree(plain, big)
        photo_like(8000, 6000, seed=99).save(big / "img0003.jpg", format="JPEG", quality=90)
    cases = [("before", before_src(), plain), ("after", REPO / "src", plain), ("after", REPO / "src", big)]
    if args.with_old_48mp:
        cases.append(("before", before_src(), big))
    best: dict = {}
    for _ in range(args.rounds):
        for label, src, folder in cases:
            res = run_once(src, folder)
            key = (label, folder.name)
            if key not in best or res.get("wall_s", 1e9) < best[key].get("wall_s", 1e9):
                best[key] = res
    print(f"one step, {os.cpu_count()} CPUs, best wall of {args.rounds} rounds: swav pretrain {' '.join(SETTINGS)}")
    for (label, name), r in best.items():
        if r["exit"]:
            print(f"  {label:7s} {name:22s} exit {r['exit']} after {r['wall_s']:.1f} s: {r['error']}")
        else:
            print(f"  {label:7s} {name:22s} wall {r['wall_s']:5.1f} s   peak RSS (main) {r['peak_rss_main_gb']:.2f} GB"
                  f"   peak (process tree) {r['peak_tree_gb']:.2f} GB")


if __name__ == "__main__":
    main()

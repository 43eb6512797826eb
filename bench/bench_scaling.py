"""Benchmark: how images/s and memory scale with batch size, crop count, prototypes and processes.

    python bench/bench_scaling.py [--preset fashion-mnist] [--device cpu] [--steps 3] [--only batch,crops,k,procs]

Every point is a separate ``swav bench --json`` process (so that the peak memory is that
configuration's own), run one after another; ``procs`` compares one process against two
data-parallel processes started with ``torchrun`` (gloo on CPU, NCCL on GPU) at the same global
batch, each of the two with half the CPU threads. Prints one table per sweep with images/s, the
ratio to the sweep's first point, the step's fraction of the fp32 matmul rate and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(args, sets, procs=1, threads=None) -> dict:
    cmd = ["-m", "swav.cli", "bench", "--preset", args.preset, "--json", "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if args.device:
        cmd += ["--device", args.device]
    for s in list(args.set) + sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd += ["--threads", str(threads)]
    if procs > 1:
        full = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"] + cmd
    else:
        full = [sys.executable] + cmd
    out = subprocess.run(full, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(full)} failed:\n{out.stderr[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def table(title, rows):
    print(f"\n{title}")
    print(f"{'point':>22s} {'images/s':>9s} {'x first':>8s} {'% fp32 mm':>10s} {'Sinkhorn %':>10s} {'peak MiB':>9s}")
    base = rows[0][1]["images_per_s"]
    for label, r in rows:
        print(f"{label:>22s} {r['images_per_s']:9.1f} {r['images_per_s'] / base:7.2f}x "
              f"{100 * r['fraction_of_fp32_matmul']:9.1f}% {100 * r['phase_fraction']['sinkhorn']:9.2f}% "
              f"{r['peak_memory_mib']:9.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="fashion-mnist")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of a 1-process run (default: all cores)")
    ap.add_argument("--only", default="batch,crops,k,procs")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", metavar="FILE", help="append every result (one JSON object per line)")
    args = ap.parse_args()
    sweeps = {
        "batch": ("global batch size", [(f"batch {b}", [f"train.batch_size={b}"]) for b in (64, 128, 256, 512)]),
        "crops": ("crops per image", [(c, [f"augment.nmb_crops={n}", f"augment.size_crops={s}",
                                           f"augment.min_scale_crops={lo}", f"augment.max_scale_crops={hi}"])
                                      for c, n, s, lo, hi in (
                                          ("2x28", "[2]", "[28]", "[0.3]", "[1.0]"),
                                          ("2x28+2x16", "[2,2]", "[28,16]", "[0.3,0.1]", "[1.0,0.3]"),
                                          ("2x28+4x16", "[2,4]", "[28,16]", "[0.3,0.1]", "[1.0,0.3]"),
                                          ("2x28+6x16", "[2,6]", "[28,16]", "[0.3,0.1]", "[1.0,0.3]"))]),
        "k": ("prototypes K (queue 3840 for K >= 1000)",
              [(f"K {k}", [f"model.nmb_prototypes={k}"] + (["swav.queue_length=3840"] if k >= 1000 else []))
               for k in (100, 300, 1000, 3000)]),
    }
    cores = os.cpu_count() or 1
    for name in args.only.split(","):
        if name == "procs":
            t1 = args.threads or cores
            rows = [(f"1 process x {t1} thr", bench(args, [], 1, t1)),
                    (f"2 processes x {max(1, t1 // 2)} thr", bench(args, [], 2, max(1, t1 // 2)))]
            table("processes at the same global batch (data-parallel, gloo on CPU)", rows)
        else:
            title, points = sweeps[name]
            rows = [(label, bench(args, sets, 1, args.threads)) for label, sets in points]
            table(title, rows)
        if args.json:
            with open(args.json, "a") as f:
                for label, r in rows:
                    f.write(json.dumps({"sweep": name, "point": label, **r}) + "\n")


if __name__ == "__main__":
    main()

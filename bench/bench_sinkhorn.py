"""Benchmark: our Sinkhorn-Knopp vs the plain float32 form (``sinkhorn_reference``), side by side.

    python bench/bench_sinkhorn.py [--device cpu|cuda] [--threads N] [--step]

For B in {256, 4096, 256 + a 3840-row queue} and K in {300, 3000} (cosine scores of random unit
vectors, eps 0.05, 3 iterations) it times, in one run and interleaved:

* ``ours``: ``sinkhorn`` as the trainer calls it (on CPU the scaling form where safe, else and on
  GPU the log domain without host syncs);
* ``ours-log``: ``sinkhorn(..., linear=False)``, the log domain forced;
* ``plain``: ``sinkhorn_reference``, the official linear-space algorithm in float32;

and prints milliseconds (best of the repetitions, and the median) and the ratio plain / ours.
``--step`` then measures Sinkhorn's share of a training step at the official settings (see
``step_share``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn, sinkhorn_reference

CASES = [("256", 256, 300), ("256", 256, 3000), ("4096", 4096, 300), ("4096", 4096, 3000),
         ("256+3840q", 256 + 3840, 3000)]


def scores(b, k, device, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return (z @ c.t()).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_many(fns: dict, device, min_time=1.0, max_reps=50, clock=time.perf_counter):
    """Interleaved timings: one call of each function per round. Returns {name: [seconds, ...]}."""
    for f in fns.values():
        f()
    sync(device)
    out = {k: [] for k in fns}
    t_start, reps = time.perf_counter(), 0
    while reps < max_reps and (reps < 3 or time.perf_counter() - t_start < min_time):
        for name, f in fns.items():
            t0 = clock()
            f()
            sync(device)
            out[name].append(clock() - t0)
        reps += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--step", action="store_true", help="also measure Sinkhorn's share of a training step")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--step-batch", type=int, default=None,
                    help="images per process in --step (default 64 on a GPU, 16 on a CPU: a smaller batch makes "
                         "the step shorter, so Sinkhorn's share larger: conservative)")
    ap.add_argument("--step-steps", type=int, default=3, help="timed steps in --step (default 3)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU time of this process (CPU only; robust on a machine shared with other jobs, "
                         "use with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"Sinkhorn, eps {args.eps}, 3 iterations, {device}, torch threads {torch.get_num_threads()}, "
          f"{args.clock} clock")
    print(f"{'B':>11s} {'K':>5s} {'ours ms':>14s} {'ours-log ms':>14s} {'plain ms':>14s} {'plain/ours':>10s}"
          f" {'max|ours-plain|':>15s}")
    for label, b, k in CASES:
        s = scores(b, k, device)
        fns = {"ours": lambda: sinkhorn(s, args.eps, 3), "log": lambda: sinkhorn(s, args.eps, 3, linear=False),
               "plain": lambda: sinkhorn_reference(s, args.eps, 3)}
        t = time_many(fns, device, args.min_time, clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        err = (sinkhorn(s, args.eps, 3) - sinkhorn_reference(s, args.eps, 3)).abs().max().item()
        cell = {n: f"{1e3 * min(v):6.2f} ({1e3 * statistics.median(v):5.2f})" for n, v in t.items()}
        print(f"{label:>11s} {k:5d} {cell['ours']:>14s} {cell['log']:>14s} {cell['plain']:>14s} "
              f"{min(t['plain']) / min(t['ours']):9.2f}x {err:15.2e}")
    print("(best of the repetitions, median in brackets)")
    if args.step:
        step_share(args, device)


def step_share(args, device):
    """Sinkhorn's share of a training step at the official settings (ResNet-50, 2x224 + 6x96 crops,
    K 3000, eps 0.05, 3 iterations, a 3840-row queue, global batch 4096).

    (a) ``swav bench`` of the ``imagenet`` preset with ``--step-batch`` images per process and the
        whole 3840-row queue in this process: Sinkhorn on (3840 + b) x 3000 per assignment crop,
        measured inside the step. A rank of a 64-GPU run holds 60 queue rows, so this overstates it.
    (b) Sinkhorn on the global (4096 + 3840) x 3000 matrix in this one process, twice (two
        assignment crops), against the same step time: the cost if a rank did every column itself
        (it does not: columns stay local and only K-vectors are all-reduced), an upper bound.
    """
    from swav.benchmark import format_report, run_benchmark
    from swav.config import make_config

    b = args.step_batch or (64 if device.type == "cuda" else 16)
    cfg = make_config("imagenet", overrides=[f"train.batch_size={b}", "swav.queue_length=3840",
                                             f"train.device={device}",
                                             f"train.precision={'fp16' if device.type == 'cuda' else 'bf16'}"])
    r = run_benchmark(cfg, steps=args.step_steps, warmup=1)
    print(format_report(r))
    step_ms = r["step_ms"]
    s = scores(4096 + 3840, 3000, device)
    t = time_many({"ours": lambda: sinkhorn(s, args.eps, 3)}, device, args.min_time)["ours"]
    glob_ms = 2 * 1e3 * statistics.median(t)
    print(f"\nofficial settings, {device}: ResNet-50 2x224+6x96, K 3000, queue 3840, {b} images per process, "
          f"{r['precision']}; step {step_ms:.0f} ms")
    print(f"  (a) Sinkhorn inside the step ({3840 + b} x 3000, 2 crops): {r['phases_ms']['sinkhorn']:.1f} ms = "
          f"{100 * r['phase_fraction']['sinkhorn']:.2f} % of the step")
    print(f"  (b) Sinkhorn on the global {4096 + 3840} x 3000, 2 crops, one process: {glob_ms:.1f} ms = "
          f"{100 * glob_ms / (step_ms + glob_ms - r['phases_ms']['sinkhorn']):.2f} % of a step that paid it")


if __name__ == "__main__":
    main()

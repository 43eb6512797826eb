"""Benchmark: precision and memory layout of the training step, side by side, per device.

    python bench/bench_precision.py [--preset fashion-mnist] [--device cpu|cuda] [--rounds 3] [--steps 3]
                                    [--variants fp32,bf16,fp32-cl,bf16-cl,bf16-compile] [--set KEY=VALUE ...]

Variants: ``fp32`` / ``bf16`` (autocast) / ``fp16`` (autocast + loss scaling, GPU), with ``-cl``
for channels_last and ``-compile`` for ``torch.compile`` of the model. Every variant is a
``swav.benchmark.run_benchmark`` of the same preset (the library's real step); the variants run
in rounds (fp32, bf16, ..., fp32, bf16, ...) so that a busy machine slows them alike, and the
table gives the median images/s over the rounds with its min-max spread, the ratio to the first
variant, and the whole step's arithmetic rate as a fraction of the fp32 matrix-product rate
measured in the same call. On CPU the last columns give the same in CPU time of the process
(per CPU-second, against the matmul's rate per CPU-second): with one thread that is what an
otherwise idle core gives, so it is the figure to trust on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import json
import statistics

from swav.benchmark import run_benchmark
from swav.config import make_config


def variant_settings(name: str) -> list[str]:
    parts = name.split("-")
    out = [f"train.precision={parts[0]}"]
    out.append(f"train.channels_last={'cl' in parts[1:]}")
    out.append(f"train.compile={'compile' in parts[1:]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="fashion-mnist")
    ap.add_argument("--device", default=None)
    ap.add_argument("--variants", default="fp32,bf16,fp32-cl,bf16-cl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", metavar="FILE", help="append every run's result (one JSON object per line)")
    args = ap.parse_args()
    names = args.variants.split(",")
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            sets = list(args.set) + variant_settings(n) + ([f"train.device={args.device}"] if args.device else [])
            cfg = make_config(args.preset, overrides=sets)
            res = run_benchmark(cfg, steps=args.steps, warmup=args.warmup)
            res["variant"] = n
            runs[n].append(res)
            cpu = (f", in CPU time {res['cpu_ms_per_step']:.0f} ms/step = "
                   f"{100 * res['fraction_of_fp32_matmul_cpu_time']:.1f} %" if "cpu_ms_per_step" in res else "")
            print(f"round {r + 1} {n:14s} {res['images_per_s']:9.1f} images/s  "
                  f"{100 * res['fraction_of_fp32_matmul']:5.1f} % of fp32 matmul "
                  f"({1e3 * res['matmul_tflops']['fp32']:.0f} GFLOP/s){cpu}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
    first = runs[names[0]][0]
    print(f"\n{args.preset} on {first['device']} ({first['device_name']}), {first['threads']} threads, batch "
          f"{first['batch_size']}, crops {first['crops']}; {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':14s} {'images/s':>9s} {'(min-max)':>17s} {'x first':>8s} {'% fp32 mm':>10s} {'(min-max)':>13s}"
          f" {'fwd ms':>8s} {'bwd ms':>8s} {'CPU ms/step':>12s} {'x first':>8s} {'% fp32 mm/CPU-s':>16s}")
    base_cpu = statistics.median(r.get("cpu_ms_per_step", float("nan")) for r in runs[names[0]])
    base = statistics.median(r["images_per_s"] for r in runs[names[0]])
    for n in names:
        ips = [r["images_per_s"] for r in runs[n]]
        fr = [100 * r["fraction_of_fp32_matmul"] for r in runs[n]]
        fwd = statistics.median(r["phases_ms"]["forward"] for r in runs[n])
        bwd = statistics.median(r["phases_ms"]["backward"] for r in runs[n])
        print(f"{n:14s} {statistics.median(ips):9.1f} {f'({min(ips):.1f}-{max(ips):.1f})':>17s} "
              f"{statistics.median(ips) / base:7.2f}x {statistics.median(fr):9.1f}% {f'({min(fr):.0f}-{max(fr):.0f})':>13s}"
              f" {fwd:8.1f} {bwd:8.1f}", end="")
        if "cpu_ms_per_step" in runs[n][0]:
            cms = statistics.median(r["cpu_ms_per_step"] for r in runs[n])
            cfr = [100 * r["fraction_of_fp32_matmul_cpu_time"] for r in runs[n]]
            print(f" {cms:12.0f} {base_cpu / cms:7.2f}x {statistics.median(cfr):7.1f}% ({min(cfr):.0f}-{max(cfr):.0f})")
        else:
            print()


if __name__ == "__main__":
    main()

"""``swav bench``: time training steps of a preset and compare with the device's matrix-product rate.

The parser only builds arguments; the measuring lives in :mod:`swav.benchmark`."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add this module's sub-commands to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="time training steps: images/s, time per phase, memory, fraction of the matmul rate",
        description="Run N training steps of a preset (by default on synthetic uint8 images already in memory "
                    "on the device, so the figure is the step itself) and report images/s, the split of a step "
                    "into decode/load, augmentation, forward, Sinkhorn, loss, backward and optimizer, peak memory, "
                    "and the model's arithmetic rate as a fraction of the rate of a large matrix product timed in "
                    "the same run. Under torchrun it runs data-parallel like training.",
        epilog="examples:\n  swav bench --steps 10\n  swav bench --precision fp32 --json\n"
               "  swav bench --preset imagenet --batch-size 64 --device cuda --precision bf16 "
               "--set train.channels_last=true")
    p.add_argument("--preset", default="fashion-mnist", help="named recipe to time (default fashion-mnist)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed steps first (default 3; allocator, oneDNN / cuDNN autotuning, compile)")
    p.add_argument("--batch-size", dest="train.batch_size", type=int, default=None, metavar="B",
                   help="global batch size (default: the preset's)")
    p.add_argument("--precision", dest="train.precision", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                   help="default: the preset's (auto = bf16 where the hardware computes it natively)")
    p.add_argument("--device", dest="train.device", default=None, metavar="DEV", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data", default=None, metavar="SRC",
                   help="time the real data path from this source (built-in name, folder or file list) instead "
                        "of synthetic in-memory images")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="side of the synthetic images (default: the built-in source's, else size_crops[0]/0.875)")
    p.add_argument("--matmul-size", type=int, default=None, metavar="N",
                   help="side of the reference matrix product (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, one per core); on a machine shared with other jobs "
                        "fewer threads than cores is often faster")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="set any setting, e.g. --set train.channels_last=true (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json
    import sys

    from swav.benchmark import format_report, run_benchmark
    from swav.config import make_config

    flags = {k: getattr(args, k) for k in ("train.batch_size", "train.precision", "train.device")}
    cfg = make_config(args.preset, config_file=args.config, overrides=args.set, **flags)
    log = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    from swav import distributed as dist_utils

    # errors become exit codes in swav.commands.run (bad settings 2, a failed run 1); the process
    # group (under torchrun) is destroyed on the way out either way: left to the interpreter's exit,
    # a gloo group can abort the process instead
    try:
        res = run_benchmark(cfg, steps=args.steps, warmup=args.warmup, data=args.data, image_size=args.image_size,
                            matmul_n=args.matmul_size, threads=args.threads, log=log)
        if dist_utils.is_main():
            print(json.dumps(res) if args.json else format_report(res), flush=True)
    finally:
        dist_utils.cleanup()
    return 0

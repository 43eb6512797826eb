"""``swav prepare SRC --out DIR``: write a folder of images again at the size training decodes it
at (logic in :mod:`swav.data.prepare`)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add ``prepare`` to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a folder of photos again at the size training decodes them at (once; every epoch then "
             "decodes small files)",
        description="Decode every image below SRC at the size `swav pretrain` decodes it at (data.max_side: by "
                    "default the smallest size at which no crop of the recipe loses detail, 692 px geometric-"
                    "mean side for the paper's 224-px crops) and write it below DIR with the same sub-folders "
                    "and names. JPEGs stay JPEG, PNGs PNG, other formats become PNG (name + .png); files already "
                    "small enough are copied as they are; unusable files are listed in DIR/skipped.tsv. Rerun "
                    "the same command to finish an interrupted run. Then train with --data DIR and the same "
                    "crop settings. Worth it when the photos are much larger than the decode size (phone "
                    "photos: 12 MP and more) and training reads them for more than an epoch or two.",
        epilog="examples:\n  swav prepare photos/ --out photos-prepared/\n"
               "  swav prepare photos/ --out photos-448/ --set data.max_side=448 --workers 8")
    p.add_argument("src", metavar="SRC", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created; not inside SRC)")
    p.add_argument("--preset", default=None,
                   help="recipe whose crops and decode settings apply (default: the plain defaults, the paper's "
                        "2x224 + 6x96 crops, as the imagenet presets)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (a run's config.yaml works)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="any setting, e.g. --set data.max_side=448 or --set model.in_chans=1 (repeatable)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that decode and encode (default: one per CPU core)")
    p.add_argument("--quality", type=int, default=90, metavar="Q",
                   help="JPEG quality of re-encoded JPEGs (default 90)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    import logging
    import os

    from swav.build import decode_options
    from swav.config import make_config, validate
    from swav.data.prepare import SKIPPED_LIST, prepare_folder
    from swav.monitor import setup_logging
    from swav.progress import Progress

    cfg = make_config(args.preset, config_file=args.config, overrides=args.set)
    validate(cfg)  # a bad setting: ConfigError, exit 2
    decode = decode_options(cfg)
    workers = os.cpu_count() or 1 if args.workers is None else args.workers
    if workers < 0:
        raise ValueError(f"--workers {workers} must be >= 0")
    setup_logging(None, 0)
    bar = Progress(None, f"preparing {args.src}", unit="images", log=logging.getLogger("swav"))
    size = (f"geometric-mean side {decode['mean_side']} px, longer side <= {decode['max_side']} px"
            if decode["mean_side"] else f"longer side <= {decode['max_side']} px" if decode["max_side"]
            else "full size")

    def progress(done: int, total: int) -> None:
        bar.total = float(total)
        bar.set(done)

    try:
        res = prepare_folder(args.src, args.out, decode=decode, workers=workers, quality=args.quality,
                             on_progress=progress)
    finally:
        bar.close()
    print(f"swav prepare: {res.total} image(s) in {args.src} at {size}: {res.written} written, {res.copied} copied "
          f"as they were, {res.kept} already there, {len(res.skipped)} unusable (listed in "
          f"{os.path.join(args.out, SKIPPED_LIST)}); {res.bytes_in / 1e6:.1f} MB read, {res.bytes_out / 1e6:.1f} MB "
          "written")
    return 0

"""``swav report RUN_DIR``: the HTML report of a run (logic in :mod:`swav.report`)."""
from __future__ import annotations


def _cmd_report(args) -> int:
    from swav.monitor import setup_logging
    from swav.report import write_report

    setup_logging(None, 0)
    # not a run folder (FileNotFoundError) or a bad option (ValueError): exit 2, by swav.commands.run
    path = write_report(args.run_dir, out=args.out, data=args.data, max_images=args.max_images,
                        map_points=args.map_points, seed=args.seed, device=args.device)
    print(f"report: {path}")
    return 0


def register(sub) -> None:
    """Add ``report`` to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "report", help="write RUN_DIR/report.html: curves, prototype gallery, embedding map, evaluations",
        description="Write one self-contained HTML page about a run: training curves, the most used "
                    "prototypes with the training images nearest to them, a t-SNE map of test embeddings, "
                    "every evaluation result in RUN_DIR/eval/, the config and the hardware. Open it in any "
                    "browser; it needs no network. Works on unfinished runs too.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `swav pretrain --out`")
    p.add_argument("--out", metavar="FILE", default=None, help="write the page here (default RUN_DIR/report.html)")
    p.add_argument("--max-images", type=int, default=5000, metavar="N",
                   help="training images sampled and embedded for the prototype gallery (default 5000; "
                        "about 10 s per 1000 on a CPU for the fashion-mnist model)")
    p.add_argument("--map-points", type=int, default=2000, metavar="N",
                   help="test images on the t-SNE map (default 2000; t-SNE time grows faster than N)")
    p.add_argument("--data", metavar="SOURCE", default=None,
                   help="read gallery and map images from this source instead of the run's data.source "
                        "(when the data has moved); nothing is downloaded")
    p.add_argument("--device", default="auto", help="where to embed the images: auto (GPU if visible), cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the image samples and of t-SNE (default 0)")
    p.set_defaults(func=_cmd_report)

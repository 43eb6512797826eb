"""The ``swav`` command: builds a config from flags and calls the library. No logic lives here."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from swav.config import ConfigError, config_help, list_presets, make_config

# common flags: (flag, dotted config key)
PRETRAIN_FLAGS = [
    ("--data", "data.source"), ("--epochs", "train.epochs"), ("--batch-size", "train.batch_size"),
    ("--lr", "optim.lr"), ("--arch", "model.arch"), ("--prototypes", "model.nmb_prototypes"),
    ("--epsilon", "swav.epsilon"), ("--queue-length", "swav.queue_length"),
    ("--epoch-queue-starts", "swav.epoch_queue_starts"), ("--freeze-prototypes-epochs", "swav.freeze_prototypes_epochs"),
    ("--precision", "train.precision"), ("--device", "train.device"), ("--workers", "data.workers"),
    ("--time-budget", "train.time_budget_minutes"), ("--seed", "train.seed"),
]


def _fmt_default(value) -> str:
    return "none" if value is None else str(value)


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    helps = config_help()
    every = "\n".join(
        f"  {key} ({typ}, default {_fmt_default(default)})\n" + textwrap.fill(text, 96, initial_indent="      ",
                                                                           subsequent_indent="      ")
        for key, (typ, default, text) in helps.items()
    )
    presets = "\n".join(f"  {name:16s} {desc}" for name, desc in list_presets())
    p = sub.add_parser(
        "pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="SwAV pretraining on a folder of images or a built-in data set",
        description="Pretrain a backbone with SwAV. With no arguments: about 10 minutes on Fashion-MNIST "
                    "on this CPU, then the kNN accuracy of the learned backbone next to the same backbone at "
                    "initialisation. Several GPUs or nodes: launch the same command with torchrun.\n"
                    "Settings are applied in this order: preset < --config file < flags < --set.",
        epilog=f"presets:\n{presets}\n\nevery setting (give any with --set KEY=VALUE; the defaults shown are "
               f"before the preset):\n{every}")
    p.add_argument("--preset", default="fashion-mnist",
                   help="named recipe to start from (default fashion-mnist; 'smoke' for a seconds-long check)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (as written to RUN/config.yaml)")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<preset>); an existing run there "
                                                "with the same settings is resumed")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="set any setting, e.g. --set optim.lr=0.3 (repeatable; see the list below)")
    p.add_argument("--resume", action="store_true",
                   help="insist on resuming: fail if DIR/checkpoint.pt does not exist (resuming is automatic "
                        "anyway when it does)")
    p.add_argument("--no-report", action="store_true",
                   help="don't write RUN/report.html at the end (curves, prototype gallery, embedding map); "
                        "'swav report RUN' writes it any time")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N steps in this invocation, writing the checkpoint first (for time-limited "
                        "jobs: rerun the same command to continue); default: train to the end")
    p.add_argument("--init-from", dest="model.init_from", default=None, metavar="FILE",
                   help="start the backbone from this file's weights (a new run only; never read on resume): "
                        "a swav run folder or checkpoint, an official SwAV release, or a torchvision or timm "
                        "state dict of this backbone (.pt/.pth/.safetensors). Every backbone key must be in it; "
                        "the keys it does not use (classifier, projection head, prototypes) are named in the log "
                        "[sets model.init_from]")
    for flag, key in PRETRAIN_FLAGS:
        typ, default, text = helps[key]
        p.add_argument(flag, dest=key, default=None, metavar=typ.upper().replace(" ", "_"),
                       help=f"{text} [sets {key}; default {_fmt_default(default)} or the preset's]")
    return p


def _cmd_pretrain(args) -> int:
    from pathlib import Path

    from swav.trainer import train

    flags = {key: getattr(args, key) for _, key in PRETRAIN_FLAGS if getattr(args, key) is not None}
    if getattr(args, "model.init_from") is not None:
        flags["model.init_from"] = getattr(args, "model.init_from")
    if args.out is not None:
        flags["out"] = args.out
    cfg = make_config(args.preset, config_file=args.config, overrides=args.set, **flags)
    if args.out is None and not any(s.startswith("out=") for s in args.set) and cfg.out == "runs/swav":
        cfg.out = f"runs/{args.preset}"
    if args.resume and not (Path(cfg.out) / "checkpoint.pt").exists():
        raise ConfigError(f"--resume given but {cfg.out}/checkpoint.pt does not exist")
    result = train(cfg, max_steps=args.max_steps)
    if not result.is_main:
        return 0
    if not args.no_report and not result.stopped_by_signal:
        import logging

        from swav.extras import MissingExtraError
        from swav.report import write_report

        try:
            print(f"report: {write_report(result.out_dir)}")
        except MissingExtraError as e:  # the run is complete; the report needs the report extra
            logging.getLogger("swav").warning("no report written: %s, then 'swav report %s' (the run is complete)",
                                              e, result.out_dir)
        except Exception as e:  # the run's outputs are safe; the report can be rebuilt
            logging.getLogger("swav").warning("the report could not be written (%s: %s); the run is complete; "
                                              "retry with 'swav report %s'", type(e).__name__, e, result.out_dir)
    print(f"run folder: {result.out_dir} ({result.global_step} steps, {result.epochs} epochs, "
          f"{result.seconds / 60:.1f} min)")
    if result.final is not None:
        print(result.final.table(str(cfg.data.source)))
        print(f"(saved in {result.out_dir / 'eval' / 'final.json'})")
    return 0


def _cmd_presets(args) -> int:
    for name, desc in list_presets():
        print(f"{name:16s} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from swav.commands import COMMAND_MODULES, EXIT_CODES_HELP

    parser = argparse.ArgumentParser(prog="swav", description="SwAV self-supervised pretraining of vision backbones.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _pretrain_parser(sub).set_defaults(func=_cmd_pretrain)
    sub.add_parser("presets", help="list the named recipes").set_defaults(func=_cmd_presets)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; the exit code follows swav.commands.EXIT_CODES."""
    from swav.commands import EXIT_USAGE, run

    parser = build_parser()
    args = parser.parse_args(argv)  # bad flags: argparse prints the usage and exits 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return run(args)


def entry(argv: list[str] | None = None) -> None:
    """The ``swav`` program (console script and ``python -m swav.cli``): exits with :func:`main`'s code.

    A process of a multi-process job (torchrun, srun) ends at once after flushing its output,
    without the interpreter's finalisation: torch's DistributedDataParallel keeps the gloo group
    and its threads alive after ``destroy_process_group`` (nothing in torch 2.13 stops them), and
    a C++ thread that touches a Python object while the interpreter finalises ends the process
    with SIGABRT ("terminate called without an active exception"), which torchrun reports as a
    failed job although every output was written.
    """
    code = main(argv)
    from swav.distributed import read_env

    try:
        in_job = read_env().is_distributed
    except ValueError:  # a malformed launcher environment: the command ran as a single process
        in_job = False
    if in_job:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()  # flushes and closes the run's log file
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

"""Sub-commands of ``swav`` beyond ``pretrain``: each module has ``register(subparsers)`` that adds
its parsers with ``set_defaults(func=...)``; the functions only build arguments and call the library.

The exit-code policy of every command lives here, in one table (:data:`EXIT_CODES`) and one
function (:func:`exit_status`), which ``swav.cli.main`` applies to whatever a command raises."""
from __future__ import annotations

import errno
import os
import sys
import textwrap

COMMAND_MODULES = ("swav.commands.evaluate", "swav.commands.report", "swav.commands.bench", "swav.commands.prepare")

EXIT_OK = 0
EXIT_FAILURE = 1  # the work started and failed
EXIT_USAGE = 2  # the command could not start as given (argparse uses 2 for bad flags too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

EXIT_CODES = (
    (EXIT_OK, "success; also a pretraining run stopped by SIGTERM or SIGUSR1 (pre-emption) once its "
              "checkpoint is written: rerun the same command to resume"),
    (EXIT_FAILURE, "run failure: the work started and failed (a training error, a non-finite stop, an I/O "
                   "error while running such as a full disk, out of memory)"),
    (EXIT_USAGE, "usage or configuration error: bad flags or setting values, a file or folder named on the "
                 "command line that does not exist or cannot be used, a run folder in use by another "
                 "swav pretrain, a checkpoint that is not a swav, official SwAV or torchvision weights file, a "
                 "resume with other settings, an optional library that is not installed (the error names "
                 "the pip install)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); a pretraining run resumes from its last checkpoint when the "
                       "same command is rerun"),
)

EXIT_CODES_HELP = "exit codes (every command):\n" + "\n".join(
    textwrap.fill(text, 96, initial_indent=f"  {code:<4d} ", subsequent_indent=" " * 7) for code, text in EXIT_CODES
) + "\n" + textwrap.fill("Errors are one line without a traceback (SWAV_DEBUG=1 shows it); an unexpected error "
                        "(a bug) shows its traceback and exits 1.", 96, initial_indent="  ", subsequent_indent="  ")

# OSError kinds that say a path given to the command cannot be used (usage); any other OSError
# (ENOSPC, EFBIG, EIO, ...) comes from doing the work (run failure)
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST,
                errno.ENAMETOOLONG, errno.ELOOP}


def _out_of_memory(exc: BaseException) -> bool:
    """A host MemoryError or torch's (CUDA / MPS) OutOfMemoryError, raised or wrapped (``from e``)."""
    torch = sys.modules.get("torch")
    kinds = (MemoryError,) + ((torch.OutOfMemoryError,) if torch is not None and
                              hasattr(torch, "OutOfMemoryError") else ())
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # (older torch, and other backends, say it in a RuntimeError: "CUDA out of memory. Tried ...")
        if isinstance(exc, kinds) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
            return True
        exc = exc.__cause__
    return False


def exit_status(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` for what a command raised, or None for an unexpected error (a bug),
    which should propagate with its traceback (Python then exits 1).

    In order: Ctrl-C -> 130; out of memory -> 1; a non-finite stop (training or fine-tuning) or a
    corrupt download -> 1; an optional library that is not installed (swav.extras.MissingExtraError, or
    a ModuleNotFoundError of a module in swav.extras.OPTIONAL_MODULES) -> 2, its message naming the
    ``pip install``; a bad setting (ConfigError, ResumeMismatchError) or a bad input value
    (ValueError: the library's CheckpointError, WeightsError, EmptyDatasetError ... are ValueErrors)
    -> 2; a path that does not exist or cannot be used (FileNotFoundError, PermissionError, ...) -> 2;
    any other OSError (full disk, file too large, I/O error) -> 1."""
    from swav.config import ConfigError
    from swav.extras import missing_extra_message

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ("interrupted; a pretraining run resumes from its last checkpoint when the same "
                                  "command is rerun")
    if _out_of_memory(exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return EXIT_FAILURE, (f"out of memory ({first}); use a smaller batch (--batch-size, or --feature-batch "
                              "for eval) or a smaller model; a pretraining run resumes from its last checkpoint")
    if _is_run_failure(exc):
        return EXIT_FAILURE, str(exc)
    missing = missing_extra_message(exc)
    if missing is not None:  # an optional library (swav.extras): the one line names the pip install
        return EXIT_USAGE, missing
    if isinstance(exc, ConfigError):
        return EXIT_USAGE, f"invalid configuration:\n{exc}"
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OSError):
        usage = isinstance(exc, _PATH_ERRORS) or exc.errno in _PATH_ERRNOS
        return (EXIT_USAGE if usage else EXIT_FAILURE), str(exc)
    return None


def _is_run_failure(exc: BaseException) -> bool:
    from swav.data.builtin import ChecksumError
    from swav.monitor import NonFiniteError

    # FloatingPointError: eval finetune's non-finite loss; ChecksumError: a download that arrived corrupt
    return isinstance(exc, (NonFiniteError, FloatingPointError, ChecksumError))


def run(args) -> int:
    """Run the command ``args.func`` (parsed by ``swav.cli.build_parser``) and return its exit code:
    what it returns, or :func:`exit_status` of what it raises, printed as one line on stderr."""
    try:
        return int(args.func(args) or 0)
    except BaseException as e:  # noqa: B902 - KeyboardInterrupt included; SystemExit passes through
        if isinstance(e, SystemExit) or os.environ.get("SWAV_DEBUG"):
            raise
        status = exit_status(e)
        if status is None:
            raise
        code, message = status
        words = getattr(args, "_words", None) or (args.command,)
        print(f"swav {' '.join(words)}: {'' if code == EXIT_INTERRUPTED else 'error: '}{message}", file=sys.stderr)
        return code

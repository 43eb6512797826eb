"""Logging, metrics files, progress display and training-health checks.

Nothing here calls ``.item()`` on the hot path unless asked to:
:func:`assignment_stats` returns tensors, :class:`ProgressBar` converts
tensor fields only on the steps it actually draws, and :class:`NaNGuard`
counts bad steps on the device, read on the host only when asked.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import torch
from torch import nn

__all__ = [
    "setup_logging",
    "MetricsWriter",
    "read_metrics",
    "ProgressBar",
    "assignment_stats",
    "CollapseWatch",
    "NaNGuard",
    "NONFINITE_CAUSES",
    "NonFiniteError",
    "nonfinite_causes",
]

LOGGER_NAME = "swav"
_log = logging.getLogger(LOGGER_NAME)


# --------------------------------------------------------------------------- logging


def setup_logging(out_dir: Path | str | None, rank: int) -> logging.Logger:
    """Configure and return the ``"swav"`` logger.

    Rank 0 logs INFO and up to stderr and, when ``out_dir`` is given, appends
    to ``out_dir/log.txt``.  Other ranks log WARNING and up to stderr only,
    each line prefixed with ``[rank N]``.  Calling it again replaces the
    handlers installed by the previous call (no duplicated lines).  Messages
    do not propagate to the root logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_swav_handler", False):
            logger.removeHandler(h)
            h.close()
    logger.propagate = False

    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    else:
        logger.setLevel(logging.WARNING)
        fmt = logging.Formatter(
            f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out / "log.txt", mode="a", encoding="utf-8",
                                              errors="backslashreplace"))
    for h in handlers:
        h.setFormatter(fmt)
        h._swav_handler = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    return logger


# --------------------------------------------------------------------------- metrics

_tensorboard_note_done = False


def _tensorboard_available() -> bool:
    from swav.extras import is_installed

    return is_installed("tensorboard")


class MetricsWriter:
    """Append-only ``metrics.jsonl`` (+ TensorBoard events when available).

    Each :meth:`write` appends one line ``{"step": int, "time": unix, **metrics}``
    and flushes it (and that step's TensorBoard events), so killing the process
    loses at most the line being written.  Numbers (python or 0-dim/1-element
    tensors, which costs a host sync) are stored as floats; strings are kept
    as-is in the JSON and not sent to TensorBoard.  Non-finite floats are
    written as ``NaN`` / ``Infinity`` (Python's ``json`` reads them back).

    On open, a partial last line left by a killed run is cut off so that the
    appended lines stay parseable.  With ``enabled=False`` (non-main ranks)
    nothing is created or written.
    """

    def __init__(self, out_dir: Path | str, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file: TextIO | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if _tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        else:
            from swav.extras import install_hint

            global _tensorboard_note_done
            if not _tensorboard_note_done:
                _tensorboard_note_done = True
                _log.info("tensorboard is not installed: metrics go to %s only; for TensorBoard event files: %s",
                          self.path, install_hint("tensorboard"))

    def write(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter.write() after close()")
        if "time" in metrics:
            raise ValueError("'time' is a reserved metrics field (the writer adds it); rename the metric")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        scalars: dict[str, float] = {}
        for name, value in metrics.items():
            if isinstance(value, str):
                record[name] = value
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise TypeError(f"metric {name!r} is a tensor with {value.numel()} elements; pass a scalar")
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {name!r} has type {type(value).__name__}; pass a number or a string")
            record[name] = scalars[name] = float(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, global_step=int(step))
            # the events go through a queue and a background thread: without this, a run that ends
            # by an exception (never reaching close()) or is killed loses its last steps' events
            # although metrics.jsonl has them
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        cut = f.read().rfind(b"\n") + 1  # 0 when there is no complete line at all
        f.truncate(cut)
    _log.warning("%s ended with a partial line (killed mid-write?); dropped it", path)


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file; a truncated last line is ignored.

    A malformed line anywhere else raises ``ValueError`` naming the line.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records: list[dict[str, Any]] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
    return records


# --------------------------------------------------------------------------- progress


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


class ProgressBar:
    """Training progress on one line.

    On a TTY the line is redrawn in place with ``\\r`` (at most every
    ``min_interval`` seconds, and always on the last step).  Otherwise a plain
    line is printed every ``every`` steps and on the last step.  ``step`` is the
    number of completed steps.  Fields are printed in the order given, e.g.
    ``update(step, epoch=3, loss=loss, img_s=812.0)``; the bar adds an ETA
    from the measured step rate.  Tensor fields are converted (host sync) only
    when a line is drawn.
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        every: int = 10,
        *,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.total = int(total_steps)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.min_interval = min_interval
        self.clock = clock
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self._start: tuple[int, float] | None = None
        self._last_draw = -math.inf
        self._last_len = 0
        self._drawn = False

    def _line(self, step: int, fields: dict[str, Any]) -> str:
        now = self.clock()
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k}={_format_value(v)}" for k, v in fields.items()]
        eta = math.nan
        if self._start is not None:
            step0, t0 = self._start
            if step > step0 and now > t0:
                rate = (step - step0) / (now - t0)
                eta = (self.total - step) / rate
        parts.append(f"eta {_format_seconds(eta)}")
        return " | ".join(parts)

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self._start is None:
            self._start = (step, now)
        last = step >= self.total
        if self.tty:
            if not last and now - self._last_draw < self.min_interval:
                return
            line = self._line(step, fields)
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
            self._last_draw = now
            self._drawn = True
        else:
            if step % self.every != 0 and not last:
                return
            self.stream.write(self._line(step, fields) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# --------------------------------------------------------------------------- health checks


def assignment_stats(codes: torch.Tensor, as_float: bool = False) -> dict[str, Any]:
    """Statistics of a batch of SwAV codes ``(B, K)`` (non-negative, rows need not be normalised).

    * ``prototype_usage``: fraction of the K prototypes that are the argmax of at least one sample.
    * ``assignment_entropy``: mean over samples of the entropy of the (row-normalised) code, in nats.
    * ``usage_entropy``: entropy of the distribution of argmax counts, in nats (``ln K`` = perfectly even).

    Returns 0-dim float32 tensors on the codes' device (no host sync) unless
    ``as_float=True``.
    """
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must have shape (B, K) with B, K > 0, got {tuple(codes.shape)}")
    with torch.no_grad():
        q = codes.detach().float()
        b, k = q.shape
        p = q / q.sum(dim=1, keepdim=True)
        assignment_entropy = -torch.special.xlogy(p, p).sum(dim=1).mean()
        counts = torch.bincount(q.argmax(dim=1), minlength=k).float()
        usage = (counts > 0).float().mean()
        freq = counts / b
        usage_entropy = -torch.special.xlogy(freq, freq).sum()
    out = {
        "prototype_usage": usage,
        "assignment_entropy": assignment_entropy,
        "usage_entropy": usage_entropy,
    }
    if as_float:
        return {name: float(v) for name, v in out.items()}
    return out


_COLLAPSE_REMEDIES = (
    "Known remedies: lower the Sinkhorn epsilon (e.g. swav.epsilon=0.03); freeze the prototypes for longer "
    "(swav.freeze_prototypes_epochs); use a smaller queue or start it later (swav.queue_length, "
    "swav.epoch_queue_starts); lower the learning rate."
)


class CollapseWatch:
    """Warn when training looks collapsed.

    Two symptoms, each tracked over consecutive :meth:`update` calls:

    * the loss stays within ``tolerance * ln K`` of ``ln K`` (the value of the
      swapped-prediction loss when the prototype scores carry no information);
    * ``prototype_usage`` stays below ``min_usage``.

    After ``patience`` consecutive updates with a symptom, :meth:`update`
    returns a warning message once; it re-arms when the symptom goes away.
    """

    def __init__(self, n_prototypes: int, patience: int = 50, tolerance: float = 0.02, min_usage: float = 0.1):
        if n_prototypes < 2:
            raise ValueError(f"n_prototypes must be >= 2, got {n_prototypes}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.n_prototypes = n_prototypes
        self.log_k = math.log(n_prototypes)
        self.patience = patience
        self.tolerance = tolerance
        self.min_usage = min_usage
        self._streak = {"loss": 0, "usage": 0}
        self._fired = {"loss": False, "usage": False}

    def update(self, step: int, loss: float, prototype_usage: float) -> str | None:
        loss = float(loss)
        usage = float(prototype_usage)
        seen = {
            "loss": math.isfinite(loss) and abs(loss - self.log_k) <= self.tolerance * self.log_k,
            "usage": usage < self.min_usage,
        }
        new: list[str] = []
        for name, present in seen.items():
            if not present:
                self._streak[name] = 0
                self._fired[name] = False
                continue
            self._streak[name] += 1
            if self._streak[name] >= self.patience and not self._fired[name]:
                self._fired[name] = True
                new.append(name)
        if not new:
            return None
        what = []
        if "loss" in new:
            what.append(
                f"the loss ({loss:.4f}) has stayed within {self.tolerance * self.log_k:.3f} of "
                f"ln K = {self.log_k:.4f} (K={self.n_prototypes}) for {self._streak['loss']} steps"
            )
        if "usage" in new:
            what.append(
                f"only {usage:.1%} of the prototypes have been the argmax of any sample for "
                f"{self._streak['usage']} steps (threshold {self.min_usage:.0%})"
            )
        return f"Possible collapse at step {step}: {'; '.join(what)}. {_COLLAPSE_REMEDIES}"


class NonFiniteError(RuntimeError):
    """Raised by :class:`NaNGuard` after too many consecutive non-finite steps."""


#: the causes a training step records for a non-finite step, in the order of ``NaNGuard.observe``
NONFINITE_CAUSES = ("loss", "BatchNorm statistics", "gradients")


def nonfinite_causes(flags) -> list[str]:
    """Names of a step's non-finite causes from its 3 flags (:data:`NONFINITE_CAUSES`); gradients
    are named only when neither the loss nor a BatchNorm statistic was (a non-finite loss makes
    every gradient non-finite)."""
    flags = [bool(f) for f in flags]
    named = [n for n, on in zip(NONFINITE_CAUSES[:2], flags[:2]) if on]
    return named or (["gradients"] if flags[2] else [])


class NaNGuard:
    """Watch that the loss and all gradients are finite; stop after ``patience`` bad steps in a row.

    Two ways to use it:

    * :meth:`check` after ``backward()`` (after ``GradScaler.unscale_`` when using one): one host
      sync; skip ``optimizer.step()`` when it returns ``False``; after ``patience`` consecutive
      bad steps it raises :class:`NonFiniteError`. Gradients are reduced with an infinity-norm
      (max |g|), so a finite gradient never reads as non-finite.
    * the training step's way, which never waits for the host: :meth:`observe` records each
      step's device-side verdict (the step itself is undone on the device) in counters that live
      on the device; :meth:`read` (at a log line or a checkpoint) brings them to the host once,
      updates ``consecutive`` and ``bad_steps_total`` and raises :class:`NonFiniteError` when a
      run of ``patience`` bad steps happened since the last read.
    """

    def __init__(self, patience: int = 10):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.consecutive = 0
        self.bad_steps_total = 0
        # on the device: [bad steps since the last read, current run, longest run since the last
        # read, number of the last bad step] and the causes of the last bad step
        self._counts: torch.Tensor | None = None
        self._causes: torch.Tensor | None = None

    def observe(self, bad: torch.Tensor, causes: torch.Tensor, step: int = 0) -> None:
        """Record one step: ``bad`` (0-dim bool) and its ``causes`` ((3,) bool, see
        :data:`NONFINITE_CAUSES`), on their device, without a host read; ``step`` numbers it."""
        if self._counts is None or self._counts.device != bad.device:
            self._counts = torch.zeros(4, dtype=torch.int64, device=bad.device)
            self._counts[1] = self.consecutive
            self._causes = torch.zeros(len(NONFINITE_CAUSES), dtype=torch.bool, device=bad.device)
        b = bad.to(torch.int64)
        c = self._counts
        run = (c[1] + 1) * b  # a finite step ends the run
        self._counts = torch.stack([c[0] + b, run, torch.maximum(c[2], run), torch.where(bad, step, c[3])])
        self._causes = torch.where(bad, causes, self._causes)

    def read(self) -> tuple[int, int, list[str]]:
        """One host read of the device counters: ``(bad steps since the last read, the step number
        of the last of them, its causes)``. Raises NonFiniteError when ``patience`` bad steps came
        in a row."""
        if self._counts is None:
            return 0, -1, []
        since, run, longest, last = (int(v) for v in self._counts.cpu())
        causes = nonfinite_causes(self._causes.cpu().tolist())
        self._counts = self._counts.clone()
        self._counts[0], self._counts[2] = 0, 0  # the current run and the last bad step go on
        self.bad_steps_total += since
        self.consecutive = run
        if longest >= self.patience:
            self.consecutive = max(run, longest)
            raise NonFiniteError(self._summary(causes))
        return since, last, causes

    def _summary(self, causes: list[str]) -> str:
        return (f"loss or gradients were non-finite for {self.consecutive} consecutive steps "
                f"({self.bad_steps_total} in total); the last bad step had a non-finite "
                f"{' and '.join(causes) or 'value on another rank'}. " + _ADVICE)

    def check(self, loss: torch.Tensor | float, model: nn.Module | Iterable[torch.Tensor]) -> bool:
        loss_t = torch.as_tensor(loss).detach()
        if not isinstance(model, nn.Module):
            model = list(model)  # may be a one-shot iterator; _message walks it again
        params = model.parameters() if isinstance(model, nn.Module) else model
        grads = [p.grad for p in params if p.grad is not None and p.grad.numel() > 0]
        values = [loss_t.float().reshape(-1).abs().amax() if loss_t.numel() else loss_t.new_zeros(())]
        if grads:
            norms = torch._foreach_norm(grads, math.inf)
            values.extend(n.to(device=loss_t.device, dtype=torch.float32) for n in norms)
        ok = bool(torch.isfinite(torch.stack(values)).all().item())
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.bad_steps_total += 1
        if self.consecutive >= self.patience:
            raise NonFiniteError(self._message(loss_t, model))
        return False

    def _message(self, loss_t: torch.Tensor, model: nn.Module | Iterable[torch.Tensor]) -> str:
        loss_ok = bool(torch.isfinite(loss_t).all())
        if isinstance(model, nn.Module):
            named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        else:
            named = [(f"tensor {i}", p.grad) for i, p in enumerate(model) if p.grad is not None]
        bad = [n for n, g in named if not bool(torch.isfinite(g).all())]
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        return (
            f"loss or gradients were non-finite for {self.consecutive} consecutive steps "
            f"({self.bad_steps_total} in total). Last step: loss is {'finite' if loss_ok else 'NOT finite'}; "
            f"{len(bad)} of {len(named)} gradients non-finite{': ' + shown if bad else ''}. " + _ADVICE
        )


_ADVICE = ("What to try: lower the learning rate (or lengthen the warmup); use bf16 autocast instead of "
           "fp16; check the input data for NaN/inf or corrupt images. Lowering the Sinkhorn epsilon is "
           "not the fix: the Sinkhorn here runs in the log domain and does not overflow.")

"""Progress of long work (downloads, feature extraction, preparing data, evaluations): how much is
done, the rate and the time left.

One class, :class:`Progress`, for every kind of work::

    from swav.progress import Progress

    with Progress(total_bytes, "downloading stl10_binary.tar.gz", unit="B") as bar:
        for chunk in chunks:
            bar.update(len(chunk))          # that many more units done

    bar = Progress(len(dataset), "kNN: train features", unit="images", log=logging.getLogger("swav"))
    bar.set(done)                           # or: so many units done so far
    bar.close()

Where it writes depends on the stream (default ``sys.stderr``, looked up when the object is made):

* on a terminal (``stream.isatty()``): one live line, redrawn in place with ``\\r`` at most every
  ``min_interval`` seconds (and always at the end), e.g.
  ``downloading x.tar.gz: 1.2 GB/2.6 GB (46 %) | 21.5 MB/s | 1 min 05 s left``; ``close()`` ends it
  with a newline;
* anywhere else (a log file, a pipe, a job's output file): a line only when the work crosses the
  next tenth of ``total``, so at most one line per 10 % (10 lines at most, the last at 100 % with
  the total time); to the logger ``log`` at INFO level when one is given (so the lines reach
  every handler of a run's log, e.g. ``log.txt``), else to the stream.

``total=None`` (unknown, e.g. a download without a size): the live line shows the amount and the
rate; elsewhere a line every ``quiet_interval`` seconds and one at ``close()``.

Rates and times come from ``clock`` (default ``time.monotonic``): the rate is the average since
the object was made, the time left is what remains at that rate. With ``enabled=False`` nothing is
written, and :meth:`Progress.line` still gives the line, for a caller that writes its own (the
linear probe's epoch lines). ``unit="B"`` prints bytes as
kB / MB / GB (powers of 1000); any other unit is printed after a count with thousands separators.
The module depends only on the standard library, so any part of swav may use it.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress", "format_amount", "format_duration"]


def _monotonic() -> float:
    """The default clock (a module-level name, so a test can give every Progress a fake one)."""
    return time.monotonic()


def format_duration(seconds: float) -> str:
    """``7 s``, ``3 min 05 s``, ``2 h 03 min``; ``?`` when unknown (not finite or negative)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_amount(value: float, unit: str) -> str:
    """``1.2 GB`` for ``unit="B"`` (powers of 1000), else ``12,800 images``-style counts (no unit)."""
    if unit != "B":
        return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"
    for factor, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {name}"
    return f"{int(value)} B"


def _format_rate(rate: float, unit: str) -> str:
    if not math.isfinite(rate) or rate <= 0:
        return f"? {unit}/s"
    if unit == "B":
        return f"{format_amount(rate, 'B')}/s"
    return f"{rate:.1f} {unit}/s" if rate < 100 else f"{rate:,.0f} {unit}/s"


class Progress:
    """How far one piece of long work is: ``update(n)`` / ``set(done)``, then ``close()`` (or use
    it as a context manager). See the module's docstring for what it writes where.

    Args:
        total: units of the whole work, or None when unknown.
        desc: what is being done, the start of every line (``"downloading cifar-10.tar.gz"``).
        unit: ``"B"`` for bytes, else the name of the counted things (``"images"``, ``"steps"``).
        stream: where the live line (or, without ``log``, the sparse lines) goes; default stderr.
        log: a logger for the sparse lines of a non-terminal stream (INFO level).
        enabled: False shows nothing (other ranks, ``--quiet``).
        min_interval: seconds between two redraws of the live line.
        quiet_interval: seconds between two sparse lines when ``total`` is unknown.
        clock: seconds, monotonic (default ``time.monotonic``; tests give a fake one).
    """

    def __init__(self, total: float | None, desc: str, *, unit: str = "items", stream: TextIO | None = None,
                 log: logging.Logger | None = None, enabled: bool = True, min_interval: float = 0.2,
                 quiet_interval: float = 60.0, clock: Callable[[], float] | None = None):
        self.total = None if total is None or total <= 0 else float(total)
        self.desc, self.unit, self.log, self.enabled = desc, unit, log, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval, self.quiet_interval = min_interval, quiet_interval
        self.clock = clock if clock is not None else _monotonic
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.done = 0.0
        self.t0 = self.clock()
        self._last_draw = -math.inf  # terminal: when the live line was last drawn
        self._drawn_len = 0  # terminal: length of the live line on screen (0: none)
        self._tenths = 0  # elsewhere: tenths of the total already reported
        self._last_line = self.t0  # elsewhere, unknown total: when the last line was written
        self._closed = False

    # -- what the work calls
    def update(self, n: float = 1) -> None:
        """``n`` more units are done."""
        self.set(self.done + n)

    def set(self, done: float) -> None:
        """``done`` units are done so far."""
        self.done = float(done)
        if not self.enabled or self._closed:
            return
        now = self.clock()
        finished = self.total is not None and self.done >= self.total
        if self.tty:
            if finished or now - self._last_draw >= self.min_interval:
                self._draw(now)
        elif self.total is not None:
            tenths = min(10, int(math.floor(10 * self.done / self.total + 1e-9)))
            if tenths > self._tenths:
                self._tenths = tenths
                self._write_line(self.line(now))
        elif now - self._last_line >= self.quiet_interval:
            self._last_line = now
            self._write_line(self.line(now))

    def close(self) -> None:
        """End the live line (terminal) or, for an unknown total, write the closing line."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self.tty:
            if self._drawn_len or self.done > 0:
                self._draw(self.clock())
                self.stream.write("\n")
                self.stream.flush()
        elif self.total is None and self.done > 0:
            self._write_line(self.line(self.clock()))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the line
    def line(self, now: float | None = None) -> str:
        """The progress line at time ``now``: done/total (percent), rate, time left or total time."""
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else math.nan
        amount = format_amount(self.done, self.unit)
        if self.total is None:
            what = amount if self.unit == "B" else f"{amount} {self.unit}"
            return f"{self.desc}: {what} | {_format_rate(rate, self.unit)} | {format_duration(elapsed)} so far"
        total = format_amount(self.total, self.unit)
        what = f"{amount}/{total}" + ("" if self.unit == "B" else f" {self.unit}")
        pct = 100.0 * min(self.done, self.total) / self.total
        if self.done >= self.total:
            when = f"done in {format_duration(elapsed)}"
        else:
            left = (self.total - self.done) / rate if rate > 0 else math.nan
            when = f"{format_duration(left)} left"
        return f"{self.desc}: {what} ({pct:.0f} %) | {_format_rate(rate, self.unit)} | {when}"

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(0, self._drawn_len - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._drawn_len = len(text)
        self._last_draw = now

    def _write_line(self, text: str) -> None:
        if self.log is not None:
            self.log.info("%s", text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

"""swav.progress.Progress: a live line with rate and time left on a terminal, at most one line per
10 % anywhere else (a log file), a closing line for work of unknown size."""
from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from swav.progress import Progress, format_amount, format_duration


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def live_lines(text: str) -> list[str]:
    """What a terminal showed, one entry per redraw (``\\r`` starts a redraw)."""
    return [part.rstrip() for part in text.replace("\n", "\r").split("\r") if part.strip()]


def test_terminal_line_has_done_total_rate_and_time_left():
    term, clock = FakeTerminal(), Clock()
    bar = Progress(1000, "features", unit="images", stream=term, clock=clock, min_interval=0.5)
    clock.t += 2.0
    bar.update(250)  # 125 images/s; 750 left -> 6 s
    assert live_lines(term.getvalue())[-1] == "features: 250/1,000 images (25 %) | 125 images/s | 6 s left"
    clock.t += 0.1
    bar.update(10)  # within min_interval: not redrawn
    assert len(live_lines(term.getvalue())) == 1
    clock.t += 2.0
    bar.set(1000)  # the end is always drawn, with the total time
    bar.close()
    shown = term.getvalue()
    assert shown.endswith("\n") and shown.count("\n") == 1  # one line, redrawn in place
    assert live_lines(shown)[-1] == "features: 1,000/1,000 images (100 %) | 244 images/s | done in 4 s"


def test_terminal_redraw_erases_a_longer_previous_line():
    term, clock = FakeTerminal(), Clock()
    bar = Progress(10**6, "x", unit="images", stream=term, clock=clock, min_interval=0)
    clock.t += 1
    bar.update(1)  # 999,999 left at 1/s: a long "left"
    first = term.getvalue()
    clock.t += 1
    bar.update(600_000)
    second = term.getvalue()[len(first):]
    assert second.startswith("\r") and len(second) - 1 >= len(first) - 1  # padded over the old text


def test_bytes_are_shown_in_kb_mb_gb():
    term, clock = FakeTerminal(), Clock()
    bar = Progress(2_600_000_000, "downloading stl10_binary.tar.gz", unit="B", stream=term, clock=clock)
    clock.t += 10
    bar.update(215_000_000)
    assert live_lines(term.getvalue())[-1] == ("downloading stl10_binary.tar.gz: 215.0 MB/2.6 GB (8 %) | 21.5 MB/s "
                                               "| 1 min 51 s left")


def test_a_file_gets_at_most_one_line_per_tenth():
    out, clock = io.StringIO(), Clock()
    bar = Progress(997, "embed", unit="images", stream=out, clock=clock)
    for i in range(997):
        clock.t += 0.01
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    pcts = [int(re.search(r"\((\d+) %\)", line).group(1)) for line in lines]
    assert pcts == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all("images/s" in line for line in lines)
    assert all(line.endswith(" left") for line in lines[:-1]) and "done in" in lines[-1]


def test_a_jump_over_several_tenths_writes_one_line():
    out, clock = io.StringIO(), Clock()
    bar = Progress(100, "x", stream=out, clock=clock)
    clock.t += 1
    bar.set(5)
    bar.set(47)  # 0 -> 40 %: one line
    bar.set(48)
    bar.set(100)
    assert [re.search(r"\((\d+) %\)", s).group(1) for s in out.getvalue().splitlines()] == ["47", "100"]


def test_sparse_lines_go_to_a_logger_when_given(caplog):
    log = logging.getLogger("swav.test_progress")
    out, clock = io.StringIO(), Clock()
    with caplog.at_level(logging.INFO, logger="swav.test_progress"):
        with Progress(20, "x", stream=out, log=log, clock=clock) as bar:
            for _ in range(20):
                clock.t += 1
                bar.update()
    assert out.getvalue() == ""
    assert len(caplog.records) == 10 and "(100 %)" in caplog.records[-1].getMessage()


def test_unknown_total_in_a_file_writes_every_interval_and_at_close():
    out, clock = io.StringIO(), Clock()
    bar = Progress(None, "downloading x", unit="B", stream=out, clock=clock, quiet_interval=60)
    for _ in range(150):
        clock.t += 1
        bar.update(1_000_000)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 60 s, 120 s, and the closing line
    assert lines[-1] == "downloading x: 150.0 MB | 1.0 MB/s | 2 min 30 s so far"


def test_disabled_writes_nothing():
    term = FakeTerminal()
    with Progress(10, "x", stream=term, enabled=False) as bar:
        bar.update(10)
    assert term.getvalue() == ""


@pytest.mark.parametrize("seconds,text", [(0.4, "0 s"), (59.6, "1 min 00 s"), (3599, "59 min 59 s"),
                                          (7380, "2 h 03 min"), (float("nan"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_amount():
    assert format_amount(999, "B") == "999 B" and format_amount(1500, "B") == "1.5 kB"
    assert format_amount(12800, "images") == "12,800"


# ---------------------------------------------------------------------------------------------
# the work that uses it: a download (bytes, from a local HTTP server) and a feature extraction
# ---------------------------------------------------------------------------------------------
class TickingClock:
    """A clock that moves 0.5 s each time it is read: every update is redrawn, rates are known."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.5
        return self.t


@pytest.fixture
def ticking(monkeypatch):
    import swav.progress

    monkeypatch.setattr(swav.progress, "_monotonic", TickingClock())


@pytest.fixture
def http_folder(tmp_path):
    """A folder served on 127.0.0.1 (the server's Content-Length gives the download's total)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _serve_file(folder, mb: int) -> tuple[str, str]:
    import hashlib

    data = bytes(range(256)) * (mb * 4096)  # mb MiB
    (folder / "data.bin").write_bytes(data)
    return "data.bin", hashlib.md5(data).hexdigest()


def _tenths(lines: list[str]) -> list[int]:
    return [int(re.search(r"\((\d+) %\)", line).group(1)) // 10 for line in lines]


def test_a_download_shows_bytes_rate_and_time_left_on_a_terminal(http_folder, tmp_path, monkeypatch, ticking):
    from swav.data.builtin import download_file

    folder, url = http_folder
    name, md5 = _serve_file(folder, 12)
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    download_file(f"{url}/{name}", tmp_path / "got.bin", md5)
    shown = live_lines(term.getvalue())
    assert len(shown) >= 12 and term.getvalue().count("\n") == 1  # one line, redrawn per chunk
    mid = shown[len(shown) // 2]
    assert re.fullmatch(r"downloading got\.bin: [\d.]+ MB/12\.6 MB \(\d+ %\) \| [\d.]+ [kM]B/s \| \d+ s left", mid), mid
    assert re.fullmatch(r"downloading got\.bin: 12\.6 MB/12\.6 MB \(100 %\) \| [\d.]+ [kM]B/s \| done in \d+ s",
                        shown[-1]), shown[-1]


def test_a_download_writes_at_most_one_log_line_per_tenth_to_a_file(http_folder, tmp_path, monkeypatch, ticking):
    from swav.data.builtin import download_file

    folder, url = http_folder
    name, md5 = _serve_file(folder, 25)  # 25 chunks of 1 MiB for 10 tenths
    log_file = tmp_path / "log.txt"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("swav")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with open(tmp_path / "stderr.txt", "w") as err:  # not a terminal
            monkeypatch.setattr(sys, "stderr", err)
            download_file(f"{url}/{name}", tmp_path / "got.bin", md5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
    lines = [line for line in log_file.read_text().splitlines() if line.startswith("downloading got.bin")]
    assert _tenths(lines) == list(range(1, 11))  # one per tenth, none skipped: 25 chunks cross each
    assert all("MB/s" in line for line in lines) and "done in" in lines[-1] and "left" in lines[0]
    assert (tmp_path / "got.bin").stat().st_size == 25 * 2**20


def _extract(tmp_path, n: int = 40):
    import numpy as np
    import torch
    from PIL import Image

    from swav.eval.data import EvalData, extract, files_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    data = EvalData(source=str(folder), size=16, workers=0, batch_size=2)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    feats, _, _ = extract(model, data, files_dataset(str(folder), 3), "cpu", "embed: features")
    assert feats.shape == (n, 3)


def test_a_feature_extraction_shows_rate_and_time_left_on_a_terminal(tmp_path, monkeypatch, ticking):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    _extract(tmp_path)
    shown = [s for s in live_lines(term.getvalue()) if s.startswith("embed: features")]
    assert len(shown) >= 10
    assert re.fullmatch(r"embed: features: \d+/40 images \(\d+ %\) \| [\d.]+ images/s \| \d+ s left", shown[5])
    assert re.fullmatch(r"embed: features: 40/40 images \(100 %\) \| [\d.]+ images/s \| done in \d+ s", shown[-1])


def test_a_feature_extraction_writes_at_most_one_line_per_tenth_to_a_file(tmp_path, monkeypatch, ticking):
    with open(tmp_path / "stderr.txt", "w") as err:
        monkeypatch.setattr(sys, "stderr", err)
        _extract(tmp_path)
    lines = [s for s in (tmp_path / "stderr.txt").read_text().splitlines() if s.startswith("embed: features")]
    assert _tenths(lines) == list(range(1, 11))  # 20 batches of 2 images: each tenth once
    assert all("images/s" in s for s in lines)

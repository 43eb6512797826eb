import io
import json
import logging
import math
import sys

import pytest
import torch
from torch import nn

from swav import monitor as M


# --------------------------------------------------------------- logging


@pytest.fixture(autouse=True)
def _restore_swav_logger():
    """setup_logging changes the global "swav" logger; put it back for other tests."""
    logger = logging.getLogger("swav")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for h in list(logger.handlers):
        if h not in saved[0]:
            logger.removeHandler(h)
            h.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_setup_logging_main_rank_writes_file(tmp_path):
    logger = M.setup_logging(tmp_path, rank=0)
    logger.info("hello %d", 1)
    logger = M.setup_logging(tmp_path, rank=0)  # second call: no duplicated handlers
    logger.info("again")
    for h in logger.handlers:
        h.flush()
    text = (tmp_path / "log.txt").read_text()
    assert text.count("hello 1") == 1 and text.count("again") == 1
    assert logger.name == "swav" and logger.level == logging.INFO


def test_setup_logging_other_rank_warning_only(tmp_path, capsys):
    logger = M.setup_logging(tmp_path / "r1", rank=1)
    logger.info("quiet")
    logger.warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err and "[rank 1]" in err and "loud" in err
    assert not (tmp_path / "r1" / "log.txt").exists()


# --------------------------------------------------------------- metrics


def test_metrics_jsonl_roundtrip(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        w.write(1, loss=5.5, lr=torch.tensor(0.1), epoch=0)
        w.write(2, loss=float("nan"), note="k clipped")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 5.5 and first["epoch"] == 0.0
    assert isinstance(first["epoch"], float) and isinstance(first["time"], float)
    assert abs(first["lr"] - 0.1) < 1e-7
    rec = M.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec] == [1, 2] and math.isnan(rec[1]["loss"]) and rec[1]["note"] == "k clipped"


def test_metrics_rejects_bad_values(tmp_path):
    w = M.MetricsWriter(tmp_path)
    with pytest.raises(TypeError):
        w.write(1, loss=[1.0])
    with pytest.raises(TypeError):
        w.write(1, loss=torch.ones(3))
    with pytest.raises(ValueError, match="reserved"):
        w.write(1, time=3.0)
    w.close()


def test_metrics_disabled_writes_nothing(tmp_path):
    w = M.MetricsWriter(tmp_path / "x", enabled=False)
    w.write(1, loss=1.0)
    w.close()
    assert not (tmp_path / "x").exists()


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in M.read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        M.read_metrics(path)


def test_writer_resumes_after_truncated_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with M.MetricsWriter(tmp_path) as w:
        w.write(3, loss=1.0)
    assert [r["step"] for r in M.read_metrics(path)] == [1, 3]


def test_metrics_without_tensorboard_writes_jsonl_only(tmp_path, monkeypatch):
    """tensorboard is in the test extras, so "not installed" is simulated: a None entry in
    sys.modules is what importlib.util.find_spec and ``import`` both read as absent. (With it
    installed, tests/test_tensorboard.py reads the event files back.)"""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(M, "_tensorboard_note_done", False)
    assert not M._tensorboard_available()
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    logger = logging.getLogger("swav")  # level and handlers are put back by _restore_swav_logger
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect(logging.INFO))
    for run in ("a", "b"):
        with M.MetricsWriter(tmp_path / run) as w:
            w.write(1, loss=2.0, note="x")
            w.write(2, loss=1.5)
    for run in ("a", "b"):
        assert [r["loss"] for r in M.read_metrics(tmp_path / run / "metrics.jsonl")] == [2.0, 1.5]
        assert not (tmp_path / run / "tensorboard").exists()
    # said once per process (not once per writer), with the way to get TensorBoard
    assert sum("tensorboard is not installed" in n and "pip install 'swav[tensorboard]'" in n for n in notes) == 1


# --------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _stream(tty: bool) -> io.StringIO:
    s = io.StringIO()
    s.isatty = lambda: tty  # type: ignore[method-assign]
    return s


def test_progress_non_tty_prints_every_n_lines():
    s, clock = _stream(False), FakeClock()
    bar = M.ProgressBar(25, enabled=True, stream=s, every=10, clock=clock)
    for step in range(1, 26):
        clock.t += 1.0
        bar.update(step, epoch=0, loss=torch.tensor(5.25), img_s=512.0)
    bar.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in s.getvalue()
    assert lines[0].startswith("step 10/25") and "epoch=0" in lines[0] and "loss=5.2500" in lines[0]
    assert "img_s=512.0" in lines[0]
    assert "eta 0:00:15" in lines[0]  # 1 s/step, 15 steps left
    assert lines[2].startswith("step 25/25") and "eta 0:00:00" in lines[2]


def test_progress_tty_single_updating_line():
    s, clock = _stream(True), FakeClock()
    bar = M.ProgressBar(5, enabled=True, stream=s, every=10, clock=clock)
    for step in range(1, 6):
        clock.t += 1.0
        bar.update(step, loss=1.0)
    bar.close()
    out = s.getvalue()
    assert out.count("\r") == 5 and out.endswith("\n") and out.count("\n") == 1
    assert "step 3/5" in out and out.rstrip().split("\r")[-1].startswith("step 5/5")


def test_progress_tty_rate_limited_and_disabled():
    s, clock = _stream(True), FakeClock()
    bar = M.ProgressBar(100, enabled=True, stream=s, clock=clock, min_interval=0.5)
    for step in range(1, 101):
        clock.t += 0.1
        bar.update(step)
    assert 15 <= s.getvalue().count("\r") <= 25  # ~every 5th step, plus the last
    s2 = _stream(True)
    off = M.ProgressBar(10, enabled=False, stream=s2)
    off.update(10, loss=1.0)
    off.close()
    assert s2.getvalue() == ""


# --------------------------------------------------------------- assignment stats


def test_assignment_stats_two_of_four_used():
    codes = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.8, 0.05, 0.05], [0.1, 0.7, 0.1, 0.1]]
    )
    st = M.assignment_stats(codes)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in st.values())
    f = M.assignment_stats(codes, as_float=True)
    assert f["prototype_usage"] == 0.5
    assert f["usage_entropy"] == pytest.approx(math.log(2))  # counts (2, 2, 0, 0)
    row_h = lambda r: -sum(x * math.log(x) for x in r)  # noqa: E731
    expect = sum(row_h(r) for r in codes.tolist()) / 4
    assert f["assignment_entropy"] == pytest.approx(expect, rel=1e-5)


def test_assignment_stats_uniform_and_one_hot():
    k = 4
    f = M.assignment_stats(torch.full((3, k), 1.0 / k), as_float=True)
    assert f["assignment_entropy"] == pytest.approx(math.log(k))
    f = M.assignment_stats(torch.eye(k) * 5.0, as_float=True)  # unnormalised rows are fine
    assert f["assignment_entropy"] == pytest.approx(0.0, abs=1e-7)  # 0 log 0 = 0
    assert f["prototype_usage"] == 1.0 and f["usage_entropy"] == pytest.approx(math.log(k))


# --------------------------------------------------------------- collapse watch


def test_collapse_watch_fires_once_per_episode():
    k = 3000
    w = M.CollapseWatch(k, patience=5, tolerance=0.02)
    msgs = [w.update(s, math.log(k), prototype_usage=0.9) for s in range(12)]
    fired = [i for i, m in enumerate(msgs) if m]
    assert fired == [4]
    m = msgs[4]
    assert "ln K" in m and "epsilon" in m and "swav.freeze_prototypes_epochs" in m
    assert "swav.queue_length" in m and "swav.epoch_queue_starts" in m and "learning rate" in m
    assert w.update(12, 3.0, 0.9) is None  # episode ends
    msgs = [w.update(13 + s, math.log(k) * 1.01, 0.9) for s in range(5)]
    assert msgs[:4] == [None] * 4 and msgs[4] is not None  # re-armed


def test_collapse_watch_quiet_when_loss_lower():
    k = 3000
    w = M.CollapseWatch(k, patience=5)
    assert all(w.update(s, math.log(k) * 0.9, 0.9) is None for s in range(50))


def test_collapse_watch_low_usage():
    w = M.CollapseWatch(100, patience=3)
    msgs = [w.update(s, 1.0, 0.05) for s in range(6)]
    assert [i for i, m in enumerate(msgs) if m] == [2]
    assert "5.0%" in msgs[2] and "prototypes" in msgs[2]


# --------------------------------------------------------------- NaN guard


def _model_with_grads(bad: bool) -> nn.Module:
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    if bad:
        model.bias.grad[0] = float("nan")
    return model


def test_nan_guard_ok_and_nan_grad():
    g = M.NaNGuard(patience=3)
    assert g.check(torch.tensor(1.0), _model_with_grads(False)) is True
    assert g.check(torch.tensor(1.0), _model_with_grads(True)) is False
    assert (g.consecutive, g.bad_steps_total) == (1, 1)
    assert g.check(torch.tensor(1.0), _model_with_grads(False)) is True
    assert (g.consecutive, g.bad_steps_total) == (0, 1)
    inf_model = _model_with_grads(False)
    inf_model.weight.grad[0, 0] = float("-inf")
    assert g.check(2.0, inf_model) is False
    assert g.check(torch.tensor(1e30), nn.Linear(2, 2)) is True  # no grads yet, large but finite


def test_nan_guard_raises_after_patience():
    g = M.NaNGuard(patience=3)
    model = _model_with_grads(False)
    assert g.check(torch.tensor(float("nan")), model) is False
    assert g.check(torch.tensor(float("inf")), model) is False
    with pytest.raises(M.NonFiniteError) as exc:
        g.check(torch.tensor(float("nan")), model)
    msg = str(exc.value)
    assert "3 consecutive" in msg and "learning rate" in msg and "bf16" in msg and "data" in msg
    assert "epsilon is not the fix" in msg
    assert g.bad_steps_total == 3

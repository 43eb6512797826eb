"""TensorBoard as a real client: the event files a training run writes, read back with TensorBoard's
own readers, hold the same values at the same steps as metrics.jsonl (compared as float32, the
precision TensorBoard stores scalars in).

tensorboard is in the ``test`` extras; without it these tests are skipped (the "not installed"
path of MetricsWriter is tested in tests/test_monitor.py)."""
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_file_loader  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from swav import monitor as M  # noqa: E402
from swav.config import make_config  # noqa: E402
from swav.trainer import train  # noqa: E402


def tb_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of a TensorBoard log folder, as TensorBoard reads it.

    Read twice: with EventAccumulator (what TensorBoard serves; no sampling), and event by event
    with event_file_loader over every events file, to see each logged (tag, step) exactly once: the
    accumulator hides some faults (it drops data logged "in the future" when a step goes back)."""
    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files in {logdir}"
    raw: dict[str, dict[int, float]] = {}
    seen: Counter = Counter()
    for f in files:
        for event in event_file_loader.EventFileLoader(str(f)).Load():
            if not event.HasField("summary"):
                continue
            for v in event.summary.value:
                seen[v.tag, event.step] += 1
                raw.setdefault(v.tag, {})[event.step] = float(tensor_util.make_ndarray(v.tensor))
    twice = sorted(k for k, n in seen.items() if n > 1)
    assert not twice, f"(tag, step) logged more than once: {twice[:10]}"

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    served = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert served.keys() == raw.keys()
    for tag in raw:
        assert served[tag].keys() == raw[tag].keys(), tag
        assert all(_same32(served[tag][s], raw[tag][s]) for s in raw[tag]), tag
    return served


def _same32(a: float, b: float) -> bool:
    a32, b32 = np.float32(a), np.float32(b)
    return bool(a32 == b32 or (np.isnan(a32) and np.isnan(b32)))


def jsonl_series(records: list[dict], tag: str) -> dict[int, float]:
    series: dict[int, float] = {}
    for r in records:
        if tag in r:
            assert r["step"] not in series, f"metrics.jsonl has {tag} twice at step {r['step']}"
            series[r["step"]] = r[tag]
    return series


def assert_same_series(tb: dict[str, dict[int, float]], records: list[dict], tag: str) -> None:
    """TensorBoard's ``tag`` has the same steps as metrics.jsonl's and, step for step, the same float32 value."""
    want = jsonl_series(records, tag)
    assert want, f"metrics.jsonl has no {tag!r}"
    assert tag in tb, f"TensorBoard has no {tag!r} (tags: {sorted(tb)})"
    got = tb[tag]
    assert sorted(got) == sorted(want), (f"{tag}: steps differ: only in TensorBoard {sorted(got.keys() - want.keys())}, "
                                         f"only in metrics.jsonl {sorted(want.keys() - got.keys())}")
    bad = [(s, want[s], got[s]) for s in sorted(want) if not _same32(want[s], got[s])]
    assert not bad, f"{tag}: (step, jsonl, TensorBoard) differ: {bad[:10]}"


def numeric_fields(records: list[dict]) -> set[str]:
    return {k for r in records for k, v in r.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def smoke(out: Path, root: Path, *extra: str):
    return make_config("smoke", overrides=[f"out={out}", f"data.root={root}", "data.subset=128",
                                           "train.batch_size=32", "train.epochs=2", *extra])


def test_training_run_tensorboard_equals_metrics_jsonl(tmp_path, fake_fmnist):
    """2 epochs of 4 steps, a log line every step, the online kNN at each epoch end and the final
    kNN: every scalar of metrics.jsonl (loss, lr, ..., knn, final_/init_ knn) is in TensorBoard at
    the same steps with the same values."""
    out = tmp_path / "run"
    result = train(smoke(out, fake_fmnist, "train.knn_every=1", "train.final_knn=true",
                         "train.knn_max_train=128"))
    assert result.global_step == 8
    records = M.read_metrics(out / "metrics.jsonl")
    tb = tb_scalars(out / "tensorboard")

    loss, lr = jsonl_series(records, "loss"), jsonl_series(records, "lr")
    assert sorted(loss) == sorted(lr) == list(range(1, 9))  # smoke logs every step
    # values that change every step, so a value logged one step off or a stale one cannot match
    assert len({np.float32(v) for v in lr.values()}) == 8
    assert len({np.float32(v) for v in loss.values()}) == 8
    assert_same_series(tb, records, "loss")
    assert_same_series(tb, records, "lr")

    fields = numeric_fields(records)
    assert {"epoch", "prototype_usage"} <= fields and any(k.startswith("final_") for k in fields), fields
    assert set(tb) == fields  # strings go to the JSON only; every number goes to both
    for tag in sorted(fields):
        assert_same_series(tb, records, tag)


def test_run_ended_by_an_exception_has_every_step_in_tensorboard(tmp_path, fake_fmnist, monkeypatch):
    """A run stopped by NonFiniteError never reaches MetricsWriter.close(); its event files still
    hold every step metrics.jsonl has, the NaN losses of the skipped steps included."""
    import swav.step as step_mod

    real = step_mod.swav_objective
    calls = {"n": 0}

    def poisoned(*args, **kw):
        loss, full = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 4 else loss), full

    monkeypatch.setattr(step_mod, "swav_objective", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(M.NonFiniteError):
        train(smoke(out, fake_fmnist, "train.nan_patience=3"))
    records = M.read_metrics(out / "metrics.jsonl")
    loss = jsonl_series(records, "loss")
    assert sorted(loss) == [1, 2, 3, 4, 5] and np.isnan(loss[5]) and not np.isnan(loss[3])
    tb = tb_scalars(out / "tensorboard")
    for tag in sorted(numeric_fields(records)):
        assert_same_series(tb, records, tag)


def test_events_are_on_disk_when_write_returns(tmp_path):
    """Each write() flushes its events, as it flushes its metrics.jsonl line: a process that dies
    right after a write (os._exit: no close(), no interpreter shutdown) has every step in both.
    Without the flush, the last few steps' events, still queued for TensorBoard's writer thread,
    are lost."""
    script = (
        "import os, sys\n"
        "from swav.monitor import MetricsWriter\n"
        "w = MetricsWriter(sys.argv[1])\n"
        "for step in range(1, 201):\n"
        "    w.write(step, loss=1.0 / step, lr=0.1 * step)\n"
        "os._exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    records = M.read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 200
    tb = tb_scalars(tmp_path / "tensorboard")
    assert_same_series(tb, records, "loss")
    assert_same_series(tb, records, "lr")


@pytest.mark.parametrize("fault", [None, "step_off_by_one", "stale_value", "one_step_missing"])
def test_the_comparison_catches_a_wrong_step_or_value(tmp_path, monkeypatch, fault):
    """The check above can fail: a writer that logs a step index one off, the previous step's
    value, or drops a step, is caught; the unmodified writer passes."""
    from torch.utils.tensorboard import SummaryWriter

    real = SummaryWriter.add_scalar
    previous: dict[str, float] = {}

    def faulty(self, tag, value, global_step=None, *args, **kw):
        if fault == "step_off_by_one":
            global_step += 1
        elif fault == "stale_value":
            value, previous[tag] = previous.get(tag, value), value
        elif fault == "one_step_missing" and global_step == 3:
            return None
        return real(self, tag, value, global_step, *args, **kw)

    monkeypatch.setattr(SummaryWriter, "add_scalar", faulty)
    with M.MetricsWriter(tmp_path) as w:
        for step in range(1, 6):
            w.write(step, loss=5.0 - 0.37 * step, lr=0.3 / step)
    tb = tb_scalars(tmp_path / "tensorboard")
    records = M.read_metrics(tmp_path / "metrics.jsonl")
    for tag in ("loss", "lr"):
        if fault is None:
            assert_same_series(tb, records, tag)
        else:
            with pytest.raises(AssertionError):
                assert_same_series(tb, records, tag)

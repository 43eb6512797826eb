"""The bad-input corpus (see conftest.write_corpus) through every data command: ``swav pretrain``,
``swav embed`` and ``swav cluster`` finish, skip exactly the 9 unusable files with a warning that
names each one (non-UTF-8 names included), count them, use every awkward-but-valid file, and no
data-loader worker dies. A folder of 100,000 entries is listed fast and pretrained on with a subset.
tests/data/test_datasets.py checks each decoding rule on its own; this is the end-to-end view."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest

from swav.checkpoint import load_run_state
from swav.data import datasets as dsmod
from swav.data.datasets import ImageFolderDataset, Skipped
from swav.data.loader import EpochLoader

from .conftest import CORPUS_EPOCHS, UNREADABLE, display, image_bytes, metrics, noise, run_cli


def _names(text: str, path: str) -> bool:
    """Whether ``text`` names ``path``: non-UTF-8 bytes as \\xNN (log files) or as the \\udcNN
    escape a terminal shows for them."""
    return display(path) in text or path.encode("utf-8", "backslashreplace").decode() in text


def _no_crash(stderr: str) -> None:
    for sign in ("Traceback", "Logging error", "DataLoader worker", "killed by signal"):
        assert sign not in stderr, f"{sign!r} in the output:\n{stderr[-3000:]}"


def test_pretrain_skips_and_names_every_bad_file(corpus, corpus_reference):
    log = (corpus_reference / "log.txt").read_text(encoding="utf-8")  # strict UTF-8: readable as text
    for name, (path, reason) in corpus.bad.items():
        lines = [ln for ln in log.splitlines() if f"skipped {display(path)}: " in ln]
        assert len(lines) == CORPUS_EPOCHS, (name, lines)  # every epoch tries every file once
        assert all(reason in ln for ln in lines), (name, lines)
    for path in corpus.good:
        assert f"skipped {display(path)}:" not in log, f"{display(path)} was skipped"
    assert log.count(" skipped ") == CORPUS_EPOCHS * len(corpus.bad)
    state = load_run_state(corpus_reference / "checkpoint.pt")
    assert state["skipped_files"] == CORPUS_EPOCHS * len(corpus.bad)
    m = metrics(corpus_reference)
    assert m[max(m)]["skipped_files"] == CORPUS_EPOCHS * len(corpus.bad)
    assert max(m) == state["global_step"] == 9  # the run went to its end


def test_loader_workers_survive_every_bad_file(corpus, monkeypatch):
    """Two worker processes decode the whole corpus: every batch arrives, the bad files come back as
    Skipped records with a reason, the good ones as images."""
    real_open = open

    def guarded(path, *a, **k):
        if UNREADABLE in os.path.basename(os.fsdecode(path)):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(dsmod, "open", guarded, raising=False)
    ds = ImageFolderDataset(corpus.root)
    loader = EpochLoader(ds, 8, seed=0, epoch=0, shuffle=False, drop_last=False, workers=2)
    batches = list(loader)
    assert len(batches) == 6
    skipped = {s.path: s.reason for b in batches for s in b.skipped}
    assert skipped.keys() == {p for p, _ in corpus.bad.values()}
    for path, reason in corpus.bad.values():
        assert reason in skipped[path], (display(path), skipped[path])
    used = sorted(ds.path(int(i)) for b in batches for i in b.indices)
    assert used == sorted(corpus.good)
    for b in batches:
        assert b.images.dtype.is_floating_point is False and b.images.shape[1] == 3
        assert (b.sizes >= 1).all()


@pytest.mark.parametrize("command", ["embed", "cluster"])
def test_embed_and_cluster_skip_and_name_every_bad_file(tmp_path, corpus, corpus_reference, command):
    out = tmp_path / ("emb" if command == "embed" else "assignments.csv")
    proc = run_cli(command, corpus_reference / "checkpoint.pt", "--data", corpus.root, "--out", out,
                   "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _no_crash(proc.stderr)
    for name, (path, reason) in corpus.bad.items():
        assert _names(proc.stderr, path), f"{name} is not named in the output"
    assert f"{len(corpus.bad)} of {corpus.n} file(s) skipped" in proc.stderr + proc.stdout
    good = sorted(os.fsencode(p) for p in corpus.good)
    if command == "embed":
        assert np.load(out / "features.npy").shape[0] == len(corpus.good)
        assert sorted((out / "files.txt").read_bytes().splitlines()) == good
        listed = dict(line.split(b"\t", 1) for line in (out / "skipped.txt").read_bytes().splitlines())
        assert sorted(listed) == sorted(os.fsencode(p) for p, _ in corpus.bad.values())
    else:
        with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        assert sorted(os.fsencode(r["path"]) for r in rows) == good


# --------------------------------------------------------------------------------------------
# 100,000 entries
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """100,000 zero-byte .jpg entries, plus 16 real images whose names sort first."""
    folder = tmp_path_factory.mktemp("big") / "images"
    folder.mkdir()
    t0 = time.perf_counter()
    for i in range(16):
        (folder / f"0000_good{i:02d}.png").write_bytes(image_bytes(noise(24, 24, i), "PNG"))
    fd_dir = os.open(folder, os.O_RDONLY)
    try:
        for i in range(100_000 - 16):
            os.close(os.open(f"empty{i:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd_dir))
    finally:
        os.close(fd_dir)
    print(f"created 100,000 entries in {time.perf_counter() - t0:.1f} s")
    return folder


def test_folder_of_100000_entries(tmp_path, big_folder):
    t0 = time.perf_counter()
    ds = ImageFolderDataset(big_folder)
    listed = time.perf_counter() - t0
    assert len(ds) == 100_000
    # a hang catcher, not a speed test (bench/bench_listing.py measures the speed)
    assert listed < 120, f"listing 100,000 entries took {listed:.1f} s"
    assert isinstance(ds[len(ds) - 1], Skipped) and "empty file" in ds[len(ds) - 1].reason
    proc = run_cli("pretrain", "--data", big_folder, "--out", tmp_path / "run", "--preset", "smoke",
                   "--set", "model.in_chans=3", "--set", "augment.mean=[0.5,0.5,0.5]",
                   "--set", "augment.std=[0.25,0.25,0.25]", "--set", "data.subset=16", "--set", "train.batch_size=16",
                   "--set", "train.epochs=1", "--set", "data.workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{big_folder}: 16 images" in proc.stderr
    assert load_run_state(tmp_path / "run" / "checkpoint.pt")["global_step"] == 1

"""Small runs shared by the report tests (one session-wide training of a few seconds each)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav.config import make_config
from swav.trainer import train

# eval/*.json files in the shape the `swav eval` commands write
EVAL_FILES = {
    "knn.json": {"command": "swav eval knn runs/smoke/checkpoint.pt --data fashion-mnist --json",
                 "metrics": {"knn_top1@20": 71.25, "knn_top5@20": 96.5},
                 "init_metrics": {"knn_top1@20": 60.0, "knn_top5@20": 90.0},
                 "dataset": "fashion-mnist", "checkpoint": "runs/smoke/checkpoint.pt", "seconds": 12.5,
                 "version": "0.1.0"},
    "linear.json": {"command": "swav eval linear runs/smoke/checkpoint.pt --epochs 3",
                    "metrics": {"top1": 74.5, "top5": 97.25},
                    "dataset": "fashion-mnist", "checkpoint": "runs/smoke/checkpoint.pt", "seconds": 61.0,
                    "version": "0.1.0"},
}
SMALL = {"max_images": 256, "map_points": 128, "device": "cpu"}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared machine torch's spinning OpenMP threads make these tiny
    models several times slower (measured: 14 s with 1 thread, 115 s with 2, on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smoke_config(out: Path, root: Path, *extra: str):
    return make_config("smoke", overrides=[f"out={out}", f"data.root={root}", "train.epochs=1", *extra])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, fake_fmnist) -> Path:
    """A finished 1-epoch smoke run (8 steps) with the final kNN and two eval result files."""
    out = tmp_path_factory.mktemp("report-run")
    torch.manual_seed(0)
    train(smoke_config(out, fake_fmnist, "train.final_knn=true"))
    (out / "eval").mkdir(exist_ok=True)  # the run wrote eval/final.json (its closing comparison)
    for name, content in EVAL_FILES.items():
        (out / "eval" / name).write_text(json.dumps(content))
    (out / "eval" / "broken.json").write_text("{not json")
    return out


@pytest.fixture(scope="session")
def finished_report(finished_run) -> Path:
    from swav.report import write_report

    return write_report(finished_run, **SMALL)


@pytest.fixture(scope="session")
def unfinished_run(tmp_path_factory, fake_fmnist) -> Path:
    """A run stopped after 3 of its 8 steps (as a killed or time-limited job leaves it)."""
    out = tmp_path_factory.mktemp("report-unfinished")
    train(smoke_config(out, fake_fmnist), max_steps=3)
    return out


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory) -> Path:
    """A run on a flat folder of images of several sizes: no labels, no test split."""
    base = tmp_path_factory.mktemp("report-folder")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(72):
        h, w = (30, 40) if i % 3 else (48, 36)
        arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        arr[:, (i % 4) * 8:(i % 4) * 8 + 6] = 230  # a bright vertical bar at one of four places
        Image.fromarray(arr).save(images / f"img{i:03d}.png")
    out = base / "run"
    train(make_config("smoke", overrides=[f"out={out}", f"data.source={images}", "train.epochs=1"]))
    return out


def copy_run(src: Path, dst: Path, *drop: str) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst

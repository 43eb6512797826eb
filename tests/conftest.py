import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Folder of official golden files: $SWAV_REFERENCE_DIR, default ../shared/golden beside the repo."""
    return Path(os.environ.get("SWAV_REFERENCE_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture
def cpu_threads():
    """Run with 2 intra-op threads (the golden files were produced with 2-thread CPU kernels; see
    tests/test_parity.py), restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def write_fake_fashion_mnist(folder: Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-format idx files of 10 learnable classes: each class a bright bar at its own
    angle and place, plus noise. Returns the folder (give it as data.root)."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28]
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.float64)
        for i, c in enumerate(labels):
            angle = np.pi * c / 10 + rng.normal(0, 0.05)
            cx, cy = 14 + rng.normal(0, 1.5), 14 + rng.normal(0, 1.5)
            dist = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle))
            images[i] += 190 * (dist < 2.0 + (c % 3))
        images = np.clip(images, 0, 255).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    return folder


@pytest.fixture
def nan_loss_step():
    """``run(learner, images, params, lr)``: one ``train_step`` whose loss is made non-finite (the
    objective's loss times NaN), for the tests that a bad step is undone."""
    import swav.step as step_mod

    def run(learner, images, params, lr):
        real = step_mod.swav_objective

        def poisoned(*args, **kwargs):
            loss, full = real(*args, **kwargs)
            return loss * float("nan"), full

        step_mod.swav_objective = poisoned
        try:
            return step_mod.train_step(learner, images, None, params, lr)
        finally:
            step_mod.swav_objective = real

    return run


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))

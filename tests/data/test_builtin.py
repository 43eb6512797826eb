"""Built-in data sets: readers of the published formats, search, download."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from swav.data import builtin
from swav.data.builtin import (
    BUILTIN_CLASSES,
    BUILTIN_NAMES,
    ChecksumError,
    DatasetNotFoundError,
    MalformedDatasetError,
    Source,
    find_builtin_root,
    load_builtin,
)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_names_and_classes():
    assert BUILTIN_NAMES == ("fashion-mnist", "cifar10", "cifar100", "stl10")
    assert [len(BUILTIN_CLASSES[n]) for n in BUILTIN_NAMES] == [10, 10, 100, 10]
    assert len(set(BUILTIN_CLASSES["cifar100"])) == 100
    assert BUILTIN_CLASSES["cifar100"][:3] == ["apple", "aquarium_fish", "baby"]


# --------------------------------------------------------------------------- #
# Fashion-MNIST (idx files)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(isolated_data, util, compress):
    ref = util.write_fashion_mnist(isolated_data / "fashion-mnist", n_train=12, n_test=5, compress=compress)
    tr = load_builtin("fashion-mnist", "train", download=False)
    te = load_builtin("fashion-mnist", "test", download=False)
    assert tr.images.shape == (12, 1, 28, 28) and te.images.shape == (5, 1, 28, 28)
    assert torch.equal(tr.images[:, 0], torch.from_numpy(ref["train"][0]))
    assert tr.images[3, 0, 5, 7] == int(ref["train"][0][3, 5, 7])
    assert te.labels.tolist() == [0, 1, 2, 3, 4] and tr.classes[0] == "T-shirt/top"
    rgb = load_builtin("fashion-mnist", "train", download=False, in_chans=3)
    assert rgb.images.shape == (12, 3, 28, 28) and torch.equal(rgb.images[:, 2], tr.images[:, 0])


def test_fashion_mnist_malformed_files_name_the_file(isolated_data, util):
    folder = isolated_data / "fashion-mnist"
    util.write_fashion_mnist(folder)
    bad = folder / "train-images-idx3-ubyte.gz"
    data = bytearray(gzip.decompress(bad.read_bytes()))
    data[3] = 2  # 2 dimensions instead of 3
    bad.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(MalformedDatasetError, match=r"train-images-idx3-ubyte\.gz.*magic"):
        load_builtin("fashion-mnist", download=False)
    data[3] = 3
    bad.write_bytes(gzip.compress(bytes(data[:-10])))  # shorter than declared
    with pytest.raises(MalformedDatasetError, match=r"train-images-idx3-ubyte\.gz.*declares shape"):
        load_builtin("fashion-mnist", download=False)
    bad.write_bytes(gzip.compress(bytes(data)))
    lab = folder / "train-labels-idx1-ubyte.gz"
    lab.write_bytes(gzip.compress(util.idx_bytes(np.arange(11, dtype=np.uint8))))
    with pytest.raises(MalformedDatasetError, match="12 images but .*11 labels"):
        load_builtin("fashion-mnist", download=False)
    lab.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(MalformedDatasetError, match=r"train-labels-idx1-ubyte\.gz.*gzip"):
        load_builtin("fashion-mnist", download=False)


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SWAV_DATA", raising=False)
    assert find_builtin_root("fashion-mnist") == DEBIAN_FMNIST
    tr = load_builtin("fashion-mnist", "train", download=False)
    te = load_builtin("fashion-mnist", "test", download=False)
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.labels.bincount().tolist() == [6000] * 10
    assert te.labels.bincount().tolist() == [1000] * 10
    assert te.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels
    assert 0 < tr.images.float().mean() < 255


# --------------------------------------------------------------------------- #
# CIFAR and STL-10 (binary records)
# --------------------------------------------------------------------------- #
def _cifar_records(n: int, label_bytes: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    pixels[:, 0, 1, 2] = 201  # R plane, row 1, column 2
    pixels[:, 2, 31, 0] = 7  # B plane, row 31, column 0
    raw = np.concatenate([labels, pixels.reshape(n, -1)], axis=1)
    return raw.tobytes(), labels, pixels


def test_cifar10_binary_layout(isolated_data):
    folder = isolated_data / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    train_px, train_lab = [], []
    for i in range(1, 6):
        raw, lab, px = _cifar_records(3, 1, seed=i)
        raw_arr = bytearray(raw)
        raw_arr[1 + 0 * 1024 + 0 * 32 + 5] = i  # record 0: R, row 0, col 5 = batch number
        (folder / f"data_batch_{i}.bin").write_bytes(bytes(raw_arr))
        px[0, 0, 0, 5] = i
        train_px.append(px)
        train_lab.append(lab[:, 0])
    raw, lab, px = _cifar_records(4, 1, seed=9)
    (folder / "test_batch.bin").write_bytes(raw)
    tr = load_builtin("cifar10", download=False)
    assert tr.images.shape == (15, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(np.concatenate(train_px)))
    assert tr.labels.tolist() == np.concatenate(train_lab).tolist()
    assert tr.images[:, 0, 1, 2].eq(201).all() and tr.images[:, 2, 31, 0].eq(7).all()
    assert tr.images[[0, 3, 6, 9, 12], 0, 0, 5].tolist() == [1, 2, 3, 4, 5]
    te = load_builtin("cifar10", "test", download=False, in_chans=1)
    assert te.images.shape == (4, 1, 32, 32) and te.labels.tolist() == lab[:, 0].tolist()
    (folder / "test_batch.bin").write_bytes(raw[:-1])
    with pytest.raises(MalformedDatasetError, match=r"test_batch\.bin.*3073"):
        load_builtin("cifar10", "test", download=False)


def _targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar100_archive_fine_labels(isolated_data):
    raw_tr, lab_tr, px_tr = _cifar_records(6, 2, seed=1)
    raw_te, lab_te, _ = _cifar_records(2, 2, seed=2)
    d = isolated_data / "cifar100"
    d.mkdir()
    _targz(
        d / "cifar-100-binary.tar.gz",
        {
            "cifar-100-binary/train.bin": raw_tr,
            "cifar-100-binary/test.bin": raw_te,
            "../evil.bin": b"x",  # never extracted
        },
    )
    assert find_builtin_root("cifar100") == d
    tr = load_builtin("cifar100", download=False)
    assert (d / "cifar-100-binary" / "train.bin").is_file() and not (isolated_data / "evil.bin").exists()
    assert tr.labels.tolist() == lab_tr[:, 1].tolist()  # fine label = second byte
    assert torch.equal(tr.images, torch.from_numpy(px_tr))
    assert len(tr.classes) == 100
    assert load_builtin("cifar100", "test", download=False).labels.tolist() == lab_te[:, 1].tolist()


def test_stl10_column_major(isolated_data):
    folder = isolated_data / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W) as displayed
    imgs[1, 0, 10, 80] = 250  # image 1, red, row 10, column 80
    imgs[1, 0, 80, 10] = 3
    stored = np.ascontiguousarray(imgs.transpose(0, 1, 3, 2))  # column-major planes
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").write_bytes(stored.tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 10, 4]))
    (folder / "unlabeled_X.bin").write_bytes(stored[:2].tobytes())
    tr = load_builtin("stl10", download=False)
    assert tr.images.shape == (3, 3, 96, 96)
    assert int(tr.images[1, 0, 10, 80]) == 250 and int(tr.images[1, 0, 80, 10]) == 3
    assert torch.equal(tr.get_batch(torch.arange(3)).images, torch.from_numpy(imgs))
    assert tr.labels.tolist() == [0, 9, 3] and tr.classes[9] == "truck"
    un = load_builtin("stl10", "unlabeled", download=False)
    assert len(un) == 2 and not un.has_labels
    with pytest.raises(ValueError, match="unlabeled"):
        load_builtin("cifar10", "unlabeled", download=False)
    (folder / "test_y.bin").write_bytes(bytes([1, 11, 4]))
    with pytest.raises(MalformedDatasetError, match=r"test_y\.bin.*1\.\.10"):
        load_builtin("stl10", "test", download=False)


# --------------------------------------------------------------------------- #
# Search order, not-found errors, downloads
# --------------------------------------------------------------------------- #
def test_search_order(tmp_path, isolated_data, util, monkeypatch):
    home_cache = tmp_path / "home" / ".cache" / "swav" / "fashion-mnist"
    util.write_fashion_mnist(home_cache, n_train=3)
    assert find_builtin_root("fashion-mnist") == home_cache
    util.write_fashion_mnist(isolated_data / "fashion-mnist", n_train=4)
    assert find_builtin_root("fashion-mnist") == isolated_data / "fashion-mnist"
    explicit = tmp_path / "explicit"
    util.write_fashion_mnist(explicit / "fashion-mnist", n_train=5)
    assert find_builtin_root("fashion-mnist", root=explicit) == explicit / "fashion-mnist"
    assert len(load_builtin("fashion-mnist", root=explicit, download=False)) == 5
    assert len(load_builtin("fashion-mnist", download=False)) == 4
    system = tmp_path / "system"
    util.write_fashion_mnist(system, n_train=6)
    monkeypatch.setitem(builtin.SYSTEM_DIRS, "fashion-mnist", (str(system),))
    monkeypatch.delenv("SWAV_DATA")
    import shutil

    shutil.rmtree(home_cache)
    assert find_builtin_root("fashion-mnist") == system
    assert len(load_builtin("fashion-mnist", download=False)) == 6


def test_not_found_message(isolated_data):
    with pytest.raises(DatasetNotFoundError) as ei:
        load_builtin("fashion-mnist", download=False)
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert str(isolated_data / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "$SWAV_DATA/fashion-mnist" in msg
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-binary\.tar\.gz"):
        load_builtin("cifar10", download=False)
    assert find_builtin_root("stl10") is None


def _serve(monkeypatch, name: str, key: str, path: Path, md5: str) -> None:
    src = builtin.SOURCES[name][key]
    monkeypatch.setitem(builtin.SOURCES[name], key, Source(src.filename, (path.as_uri(),), md5))


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_with_checksums(tmp_path, isolated_data, util, monkeypatch):
    remote = tmp_path / "remote"
    util.write_fashion_mnist(remote, n_train=9)
    for key, fname in (("train-images", "train-images-idx3-ubyte.gz"), ("train-labels", "train-labels-idx1-ubyte.gz")):
        _serve(monkeypatch, "fashion-mnist", key, remote / fname, _md5((remote / fname).read_bytes()))
    ds = load_builtin("fashion-mnist", "train", download=True)
    target = isolated_data / "fashion-mnist"
    assert len(ds) == 9 and (target / "train-images-idx3-ubyte.gz").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_download_checksum_mismatch_leaves_nothing(tmp_path, isolated_data, util, monkeypatch):
    remote = tmp_path / "remote"
    util.write_fashion_mnist(remote)
    fname = "train-images-idx3-ubyte.gz"
    _serve(monkeypatch, "fashion-mnist", "train-images", remote / fname, "0" * 32)
    with pytest.raises(ChecksumError) as ei:
        load_builtin("fashion-mnist", "train", download=True)
    msg = str(ei.value)
    assert fname in msg and "0" * 32 in msg and _md5((remote / fname).read_bytes()) in msg
    target = isolated_data / "fashion-mnist"
    assert list(target.iterdir()) == []  # no partial or temporary file left


def test_download_archive_and_failure(tmp_path, isolated_data, monkeypatch):
    raw, lab, _ = _cifar_records(2, 1, seed=3)
    members = {f"cifar-10-batches-bin/data_batch_{i}.bin": raw for i in range(1, 6)}
    members["cifar-10-batches-bin/test_batch.bin"] = raw
    archive = _targz(tmp_path / "cifar-10-binary.tar.gz", members)
    _serve(monkeypatch, "cifar10", "archive", archive, _md5(archive.read_bytes()))
    ds = load_builtin("cifar10", "test")
    assert ds.labels.tolist() == lab[:, 0].tolist()
    target = isolated_data / "cifar10"
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-bin"]  # archive removed
    _serve(monkeypatch, "stl10", "archive", tmp_path / "missing.tar.gz", "0" * 32)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)Download into .*failed.*missing\.tar\.gz"):
        load_builtin("stl10", "train")
    assert list((isolated_data / "stl10").iterdir()) == []

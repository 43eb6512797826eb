"""Linear probe on synthetic features; few-label subsets and their files."""
from __future__ import annotations

import pytest
import torch

from swav.data.datasets import ImageFilesDataset, TensorImageDataset
from swav.eval.finetune import balanced_subset, read_subset_file, subset_dataset, write_subset_file
from swav.eval.linear import CachedFeatures, topk_accuracy, train_linear_classifier


def separable(n_per_class: int, classes: int = 4, dim: int = 16, seed: int = 0):
    """Class c: Gaussian blob (std 0.3) around 3 * e_c, plus a large shared offset: linearly separable
    with a wide margin, but not centred (as pooled ReLU features are not)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    centres = 3.0 * torch.eye(classes, dim)
    x = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g) + 2.0
    return x, labels


def test_linear_probe_reaches_near_100_on_separable_features():
    xtr, ytr = separable(100)
    xte, yte = separable(50, seed=1)
    res = train_linear_classifier(CachedFeatures(xtr, ytr), xte, yte, 4, epochs=20, lr=0.3, batch_size=64)
    assert res["linear_top1"] >= 99.0 and res["linear_best_top1"] >= res["linear_top1"]
    assert res["linear_top5"] == 100.0  # 4 classes: top-5 covers all
    assert set(res) == {"linear_top1", "linear_top5", "linear_best_top1", "linear_best_top5"}


def test_linear_probe_is_seeded():
    xtr, ytr = separable(20, seed=2)
    xte, yte = separable(10, seed=3)
    a = train_linear_classifier(CachedFeatures(xtr, ytr), xte, yte, 4, epochs=3, lr=0.05, seed=5)
    b = train_linear_classifier(CachedFeatures(xtr, ytr), xte, yte, 4, epochs=3, lr=0.05, seed=5)
    assert a == b


def test_cached_views_cycle_with_the_epoch():
    feats = torch.stack([torch.full((6, 2), float(v)) for v in range(3)])  # view v is all v
    src = CachedFeatures(feats, torch.arange(6))
    g = torch.Generator().manual_seed(0)
    for epoch in range(5):
        xs = torch.cat([x for x, _ in src.epoch_batches(epoch, 4, g)])
        ys = torch.cat([y for _, y in src.epoch_batches(epoch, 4, g)])
        assert (xs == epoch % 3).all() and sorted(ys.tolist()) == list(range(6))


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    top1, top2 = topk_accuracy(logits, targets, ks=(1, 2))
    assert top1 == pytest.approx(100 / 3) and top2 == pytest.approx(200 / 3)
    assert topk_accuracy(logits, targets, ks=(5,)) == [100.0]  # clipped to 3 classes


# ------------------------------------------------------------------ few-label subsets
def test_balanced_subset_per_class_and_seeded():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 3)
    idx = balanced_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [10, 5, 1]  # round(0.1 n), at least one per class
    assert torch.equal(idx, balanced_subset(labels, 0.1, seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 0.1, seed=1))
    assert torch.equal(idx, torch.sort(idx).values)
    with pytest.raises(ValueError):
        balanced_subset(labels, 0.0)


def test_subset_file_round_trip_tensor_dataset(tmp_path):
    images = torch.zeros(20, 1, 4, 4, dtype=torch.uint8)
    labels = torch.arange(20) % 4
    ds = TensorImageDataset(images, labels)
    idx = balanced_subset(labels, 0.4, seed=3)
    f = write_subset_file(tmp_path / "s.txt", ds, idx, "test")
    assert f.read_text().startswith("# swav few-label subset: test\n")
    assert torch.equal(read_subset_file(f, ds), idx)
    sub = subset_dataset(ds, idx)
    assert len(sub) == len(idx) and torch.equal(sub.labels, labels[idx])
    # a file for another data set is refused with the reason
    (tmp_path / "bad.txt").write_text("3\t1\n99\t0\n")
    with pytest.raises(ValueError, match=r"label 1 but the data set says 3.*not an index below 20"):
        read_subset_file(tmp_path / "bad.txt", ds)


def test_subset_file_round_trip_odd_paths(tmp_path):
    paths = [str(tmp_path / n) for n in ("a.png", "tab\there.png", "new\nline.png", "back\\slash.png", "é.png")]
    ds = ImageFilesDataset(paths, [0, 1, 0, 1, 1], in_chans=1)
    idx = torch.tensor([1, 2, 3, 4])
    f = write_subset_file(tmp_path / "s.txt", ds, idx)
    assert torch.equal(read_subset_file(f, ds), idx)
    sub = subset_dataset(ds, idx)
    assert sub.paths == paths[1:] and sub.labels.tolist() == [1, 0, 1, 1]

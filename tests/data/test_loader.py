"""Batches, epoch order and the sharded epoch loader."""

from __future__ import annotations

import pytest
import torch

from swav.data.datasets import EmptyDatasetError, ImageFilesDataset, ImageFolderDataset, Skipped, TensorImageDataset
from swav.data.loader import Batch, EpochLoader, epoch_indices, pad_collate


def _tensor_ds(n: int = 40) -> TensorImageDataset:
    images = (torch.arange(n, dtype=torch.int64) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return TensorImageDataset(images, torch.arange(n) % 5, [str(k) for k in range(5)], name="t")


def _indices(loader) -> list[list[int]]:
    return [b.indices.tolist() for b in loader]


def test_epoch_indices_deterministic():
    a = epoch_indices(100, seed=3, epoch=1)
    assert torch.equal(a, epoch_indices(100, seed=3, epoch=1))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_indices(100, seed=3, epoch=2))
    assert not torch.equal(a, epoch_indices(100, seed=4, epoch=1))
    assert epoch_indices(5, seed=3, epoch=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    torch.manual_seed(0)  # the global RNG has no influence
    b = epoch_indices(100, seed=3, epoch=1)
    torch.manual_seed(1)
    assert torch.equal(b, epoch_indices(100, seed=3, epoch=1))


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharding_rule_matches_single_process(world_size):
    ds = _tensor_ds(40)
    one = EpochLoader(ds, 8, seed=0, epoch=5)
    ranks = [EpochLoader(ds, 8, seed=0, epoch=5, rank=r, world_size=world_size) for r in range(world_size)]
    assert len(one) == 5 and all(len(r) == 5 for r in ranks)
    single = list(one)
    per_rank = [list(r) for r in ranks]
    for step in range(5):
        parts = [per_rank[r][step] for r in range(world_size)]
        assert all(len(p) == 8 // world_size for p in parts)
        assert torch.cat([p.indices for p in parts]).tolist() == single[step].indices.tolist()
        assert torch.equal(torch.cat([p.images for p in parts]), single[step].images)
        assert torch.equal(torch.cat([p.labels for p in parts]), single[step].labels)
        assert one.global_batch_indices(step).tolist() == single[step].indices.tolist()
        assert ranks[1].global_batch_indices(step).tolist() == single[step].indices.tolist()
    # images really are the selected rows
    b = single[0]
    assert b.images[:, 0, 0, 0].tolist() == b.indices.tolist() and b.labels.tolist() == (b.indices % 5).tolist()
    with pytest.raises(ValueError, match="divisible"):
        EpochLoader(ds, 9, seed=0, epoch=0, world_size=2)


def test_epochs_differ_and_cover_the_data():
    ds = _tensor_ds(40)
    e0 = _indices(EpochLoader(ds, 8, seed=1, epoch=0))
    assert e0 == _indices(EpochLoader(ds, 8, seed=1, epoch=0))
    assert e0 != _indices(EpochLoader(ds, 8, seed=1, epoch=1))
    assert sorted(i for b in e0 for i in b) == list(range(40))
    loader = EpochLoader(ds, 8, seed=1, epoch=1)
    loader.set_epoch(0)
    assert _indices(loader) == e0


def test_start_step_skips_without_decoding(tmp_path, util):
    for k in range(10):
        util.save_rgb(tmp_path / f"{k}.png", 3, 3, (k, k, k))

    class Counting(ImageFolderDataset):
        calls: list[int] = []

        def __getitem__(self, i):
            Counting.calls.append(int(i))
            return super().__getitem__(i)

    ds = Counting(tmp_path)
    full = _indices(EpochLoader(ds, 2, seed=0, epoch=0))
    Counting.calls.clear()
    resumed = EpochLoader(ds, 2, seed=0, epoch=0, start_step=3)
    assert len(resumed) == 2 and resumed.steps_per_epoch == 5
    assert _indices(resumed) == full[3:]
    assert sorted(Counting.calls) == sorted(i for b in full[3:] for i in b)
    t = _tensor_ds(40)
    assert _indices(EpochLoader(t, 8, seed=2, epoch=0, start_step=4)) == _indices(EpochLoader(t, 8, seed=2, epoch=0))[4:]


def test_drop_last():
    ds = _tensor_ds(10)
    kept = EpochLoader(ds, 4, seed=0, epoch=0, drop_last=True)
    assert len(kept) == 2 and [len(x) for x in _indices(kept)] == [4, 4]
    full = EpochLoader(ds, 4, seed=0, epoch=0, drop_last=False)
    assert len(full) == 3 and [len(x) for x in _indices(full)] == [4, 4, 2]
    assert sorted(i for b in _indices(full) for i in b) == list(range(10))
    r0 = EpochLoader(ds, 8, seed=0, epoch=0, drop_last=False, rank=0, world_size=2)
    r1 = EpochLoader(ds, 8, seed=0, epoch=0, drop_last=False, rank=1, world_size=2)
    assert [len(x) for x in _indices(r0)] == [4, 2] and [len(x) for x in _indices(r1)] == [4, 0]
    with pytest.raises(ValueError, match="fewer than the global batch size"):
        EpochLoader(ds, 16, seed=0, epoch=0)


def test_workers_match_main_process(tmp_path, util):
    for k in range(12):
        util.save_rgb(tmp_path / ("a" if k % 3 else "b") / f"{k:02d}.png", 4 + k % 4, 5 + k % 3, (k, 2 * k, 3 * k))
    util.save_rgb(tmp_path / "a" / "zz_tiny.png", 1, 1)
    ds = ImageFolderDataset(tmp_path, min_size=2)
    loader = EpochLoader(ds, 4, seed=7, epoch=3, workers=0, rank=1, world_size=2, drop_last=False)
    ref = list(loader)
    par = list(EpochLoader(ds, 4, seed=7, epoch=3, workers=2, rank=1, world_size=2, drop_last=False))
    assert len(ref) == len(par) == 4
    for a, b in zip(ref, par):
        assert a.indices.tolist() == b.indices.tolist()
        assert torch.equal(a.images, b.images) and torch.equal(a.sizes, b.sizes)
        assert [s.path for s in a.skipped] == [s.path for s in b.skipped]
    mine = torch.cat([loader.rank_batch_indices(s) for s in range(loader.steps_per_epoch)]).tolist()
    got = [i for b in par for i in b.indices.tolist() + [s.index for s in b.skipped]]
    assert sorted(got) == sorted(mine)
    tiny = next(i for i in range(len(ds)) if ds.path(i).endswith("zz_tiny.png"))
    skipped = [s.index for b in par for s in b.skipped]
    assert tiny in mine and skipped == [tiny]  # seed 7 puts the 1x1 image in rank 1's share


def test_persistent_workers_reused_across_epochs(tmp_path, util):
    for k in range(6):
        util.save_rgb(tmp_path / f"{k}.png", 3, 3)
    ds = ImageFolderDataset(tmp_path)
    loader = EpochLoader(ds, 2, seed=0, epoch=0, workers=1, persistent_workers=True)
    e0 = _indices(loader)
    dl = loader._dataloader
    loader.set_epoch(1)
    e1 = _indices(loader)
    assert loader._dataloader is dl
    assert e1 == _indices(EpochLoader(ds, 2, seed=0, epoch=1)) and e0 != e1


def test_pad_collate_pads_and_records_skips():
    a = torch.full((3, 2, 5), 9, dtype=torch.uint8)
    b = torch.full((3, 4, 1), 8, dtype=torch.uint8)
    s = Skipped("/x/bad.jpg", "empty file (0 bytes)", 4)
    batch = pad_collate([(a, 1, 0), s, (b, -1, 7)])
    assert batch.images.shape == (2, 3, 4, 5)
    assert batch.sizes.tolist() == [[2, 5], [4, 1]]
    assert batch.images[0, :, :2, :].eq(9).all() and batch.images[0, :, 2:, :].eq(0).all()
    assert batch.images[1, :, :, :1].eq(8).all() and batch.images[1, :, :, 1:].eq(0).all()
    assert batch.labels.tolist() == [1, -1] and batch.indices.tolist() == [0, 7]
    assert batch.skipped == [s] and len(batch) == 2
    empty = pad_collate([s], channels=1)
    assert empty.images.shape == (0, 1, 0, 0) and empty.skipped == [s]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images)


def test_all_skipped_epoch_raises(tmp_path):
    for k in range(4):
        (tmp_path / f"{k}.jpg").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path)
    loader = EpochLoader(ds, 2, seed=0, epoch=0)
    with pytest.raises(EmptyDatasetError, match=str(tmp_path)) as ei:
        for batch in loader:
            assert len(batch) == 0 and len(batch.skipped) == 2
    assert "empty file" in str(ei.value)


def test_file_dataset_without_workers_matches_tensor_order(tmp_path, util):
    paths = [util.save_rgb(tmp_path / f"{k}.png", 2, 2, (k, 0, 0)) for k in range(8)]
    ds = ImageFilesDataset(paths)
    for b in EpochLoader(ds, 4, seed=5, epoch=0):
        assert b.images[:, 0, 0, 0].tolist() == b.indices.tolist()
    assert _indices(EpochLoader(ds, 4, seed=5, epoch=0)) == _indices(EpochLoader(_tensor_ds(8), 4, seed=5, epoch=0))

"""The one path from a labelled split to frozen features, for the kNN monitor of a training run,
the ``swav eval`` commands and the report: which data, how its images become model inputs (the
evaluation transform), and extraction that skips unusable files with a warning."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from swav.data.builtin import BUILTINS
from swav.data.datasets import (EmptyDatasetError, FileListDataset, ImageFilesDataset, IMAGE_EXTENSIONS,
                                 decode_sizes)
from swav.data.loader import Batch, EpochLoader
from swav.data.multicrop import EvalTransform
from swav.eval.features import extract_features
from swav.progress import Progress

__all__ = ["EvalData", "eval_data_for", "BatchStream", "extract", "files_dataset", "num_classes_of",
           "progress_printer", "knn_of_backbone", "IMAGENET_MEAN", "IMAGENET_STD", "BUILTIN_STATS"]

log = logging.getLogger("swav")

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
#: per-channel mean / std of the built-in data sets (used for released weights, which carry no config)
BUILTIN_STATS = {name: (list(b.mean), list(b.std)) for name, b in BUILTINS.items()}


def _fit_channels(values, in_chans: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return values * in_chans
    raise ValueError(f"{len(values)} normalisation values for {in_chans} input channels")


@dataclass
class EvalData:
    """A data source and how its images become model inputs."""

    source: str
    root: str | None = None
    in_chans: int = 3
    size: int | None = None  # explicit crop size for every source; None: see crop_size
    file_size: int = 224  # crop size of image files (folders, file lists) when ``size`` is None
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    workers: int = 0
    download: bool = True
    min_size: int = 0
    max_side: int = 0
    batch_size: int = 256
    min_side: int = 0  # fixed-size built-ins smaller than this are resized up to it (the run's large crops)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def split(self, split: str, limit: int = 0):
        """The data set of a split (``limit > 0``: its first ``limit`` images); built once."""
        from swav.data.datasets import build_dataset

        key = (split, int(limit or 0))
        if key not in self._cache:
            ds = build_dataset(self.source, split, in_chans=self.in_chans, root=self.root, download=self.download,
                               min_size=self.min_size, max_side=self.max_side)
            self._cache[key] = ds.subset(limit) if limit and limit > 0 else ds
        return self._cache[key]

    def labelled(self, split: str, limit: int = 0):
        ds = self.split(split, limit)
        if not getattr(ds, "has_labels", False):
            raise ValueError(f"this evaluation needs labels, and the {split} split of {self.source!r} has none "
                             "(folders need class sub-folders, file lists a <TAB>label per line)")
        return ds

    def crop_size(self, dataset) -> int:
        """``size`` when given; else the whole image of a fixed-size built-in at its native size (a
        centre crop smaller than a 28 px Fashion-MNIST image cuts the garment: a run trained on
        24 px crops scores 1 kNN point lower on a 24 px centre crop than on the whole image);
        else ``file_size`` (resize to size / 0.875 + centre crop)."""
        if self.size:
            return int(self.size)
        if dataset.in_memory:  # in-memory built-in of one image size
            return max(int(dataset.images.shape[-1]), int(self.min_side))
        return int(self.file_size)

    def transform(self, dataset) -> EvalTransform:
        """Resize + centre crop for image files; the native size for fixed-size built-ins, unless the
        run's large crops were larger (a network that needs 32 px or more, trained on upscaled crops of
        28-px images): then they are resized like image files."""
        size = self.crop_size(dataset)
        fixed = dataset.in_memory and size <= int(dataset.images.shape[-1])
        return EvalTransform(size, self.mean, self.std, resize=not fixed)

    @classmethod
    def from_config(cls, cfg, *, source: str | None = None, root: str | None = None, size: int | None = None,
                    workers: int | None = None, download: bool | None = None, batch_size: int = 256) -> "EvalData":
        """The evaluation data of a run's config: its source (or ``source``), image settings, the
        normalisation it trained with; image files at the large crops' size, fixed-size built-ins
        whole, at their size or the large crops' if larger (``size`` overrides both)."""
        a, d = cfg.augment, cfg.data
        return cls(source=source or d.source, root=root if root is not None else d.root, in_chans=cfg.model.in_chans,
                   size=size, file_size=a.size_crops[0], mean=_fit_channels(a.mean, cfg.model.in_chans),
                   std=_fit_channels(a.std, cfg.model.in_chans), workers=d.workers if workers is None else workers,
                   download=d.download if download is None else download, min_size=d.min_size,
                   max_side=decode_sizes(d.max_side, a.size_crops, a.min_scale_crops, a.nmb_crops)[0],
                   batch_size=batch_size, min_side=a.size_crops[0])

    def batches(self, dataset, indices: np.ndarray, batch_size: int | None = None):
        """The non-empty batches of ``dataset[indices]``, in the order given."""
        from swav.data.loader import pad_collate

        bs = batch_size or self.batch_size
        if dataset.in_memory:
            for start in range(0, len(indices), bs):
                yield dataset.get_batch(torch.as_tensor(indices[start:start + bs], dtype=torch.int64))
            return
        import functools

        sub = torch.utils.data.Subset(dataset, [int(i) for i in indices])
        loader = torch.utils.data.DataLoader(sub, batch_size=bs, shuffle=False, num_workers=self.workers,
                                             collate_fn=functools.partial(pad_collate, channels=dataset.in_chans))
        for batch in loader:
            if len(batch):  # else every file of this batch was unusable
                yield batch

    def loader(self, dataset, batch_size: int | None = None) -> EpochLoader:
        bs = min(batch_size or self.batch_size, len(dataset))
        return EpochLoader(dataset, bs, seed=0, epoch=0, shuffle=False, drop_last=False, workers=self.workers)


def eval_data_for(loaded, data: str | None = None, root: str | None = None, size: int | None = None,
                  workers: int | None = None, batch_size: int = 256) -> EvalData:
    """The data of an evaluation: the run's own source and image settings by default; ``data``
    names another source. Released files carry no data source, so they need ``data``."""
    cfg = loaded.config
    if cfg is not None:
        return EvalData.from_config(cfg, source=data, root=root, size=size, workers=workers, batch_size=batch_size)
    if not data:
        raise ValueError(f"{loaded.path} is {'an official SwAV' if loaded.kind == 'official' else 'a torchvision-layout'} file: it does not say which data it was trained "
                         "on, so give --data (a built-in name, a folder or a file list)")
    from swav.data import builtin

    in_chans = loaded.in_chans
    key = builtin.canonical_name(data)
    mean, std = BUILTIN_STATS.get(key, (IMAGENET_MEAN, IMAGENET_STD))
    return EvalData(source=data, root=root, in_chans=in_chans, size=size, mean=_fit_channels(mean, in_chans),
                    std=_fit_channels(std, in_chans), workers=2 if workers is None else workers,
                    batch_size=batch_size)


def files_dataset(source: str, in_chans: int, *, root: str | None = None, split: str = "train",
                  min_size: int = 0, max_side: int = 0):
    """Every image of a folder (recursively, any layout, sorted paths), a file list, or a built-in
    split: the input of ``swav embed`` and ``swav cluster``."""
    from swav.data import builtin
    from swav.data.datasets import scan_images, build_dataset

    if builtin.canonical_name(source) is not None:
        return build_dataset(source, split, in_chans=in_chans, root=root)
    if os.path.isdir(source):
        paths = scan_images(os.fspath(source), IMAGE_EXTENSIONS)
        if not paths:
            raise EmptyDatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) below folder {source!r}")
        return ImageFilesDataset(paths, None, None, in_chans=in_chans, min_size=min_size, max_side=max_side,
                                 name=os.fspath(source))
    if os.path.isfile(source):
        return FileListDataset(source, in_chans=in_chans, min_size=min_size, max_side=max_side)
    raise ValueError(f"--data {source!r} is neither a built-in data set, an existing folder nor a file list")


class BatchStream:
    """The non-empty batches of a loader, in order. Each unusable file is logged (warning, with its
    path and the reason) and recorded in ``skipped``; a source whose every file is unusable ends the
    stream instead of raising. ``on_batch(done, total)`` reports progress."""

    def __init__(self, loader: EpochLoader, on_batch: Callable[[int, int], None] | None = None):
        self.loader = loader
        self.on_batch = on_batch
        self.skipped: list = []
        self.total = len(loader.dataset)
        self.done = 0

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except EmptyDatasetError as e:  # every image was unusable: reported by the caller
                log.warning("%s", e)
                return
            for s in batch.skipped:
                log.warning("skipped %s: %s", s.path, s.reason)
            self.skipped.extend(batch.skipped)
            self.done += len(batch) + len(batch.skipped)
            if len(batch):
                yield batch
            if self.on_batch is not None:  # after the consumer's work on the batch (it asked for the next)
                self.on_batch(self.done, self.total)


def progress_printer(desc: str, enabled: bool = True):
    """``on_batch(done, total)`` callback showing ``desc: done/total images`` with the rate and the
    time left (:class:`swav.progress.Progress` on stderr: a live line on a terminal, a line per 10 %
    elsewhere), timed from this call."""
    bar = Progress(None, desc, unit="images", enabled=enabled)

    def report(done: int, total: int) -> None:
        bar.total = float(total) if total > 0 else None
        bar.set(done)
        if done >= total:
            bar.close()

    return report


def extract(model: torch.nn.Module, data: EvalData, dataset, device, desc: str = "features",
            progress: bool = True):
    """Features ``(N, D)`` (float32, CPU), labels and dataset indices of ``dataset`` under the eval
    transform, in dataset order; unusable files are skipped with a warning."""
    stream = BatchStream(data.loader(dataset), progress_printer(desc, progress))
    model = model.to(device)
    feats, labels, idx = extract_features(model, stream, data.transform(dataset).to(device), device)
    if stream.skipped:
        log.warning("%s: %d unusable file(s) skipped", desc, len(stream.skipped))
    return feats, labels, idx


def num_classes_of(*label_tensors: torch.Tensor, dataset=None) -> int:
    n = max(int(t.max()) + 1 for t in label_tensors)
    classes = getattr(dataset, "classes", None)
    return max(n, len(classes)) if classes else n



def knn_of_backbone(backbone: torch.nn.Module, data: EvalData, device, max_train: int = 0, k: int = 20,
                    ks=None) -> dict:
    """Weighted kNN top-1/top-5 of ``backbone``'s frozen features: the train split (its first
    ``max_train`` images, 0 = all) as memory, the test split as queries. The kNN monitor of a run."""
    from swav.eval.knn import knn_accuracy

    train_set, test_set = data.labelled("train", max_train), data.labelled("test")
    ftr, ltr, _ = extract(backbone, data, train_set, device, "kNN memory", progress=False)
    fte, lte, _ = extract(backbone, data, test_set, device, "kNN queries", progress=False)
    num_classes = int(max(ltr.max(), lte.max())) + 1
    return knn_accuracy(ftr, ltr, fte, lte, num_classes, ks=ks or (k,))

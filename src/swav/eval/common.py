"""What every evaluation shares: which data, how images become model inputs, how features are
extracted (skipping unusable files with a warning), and how results are written.

Result files (read by the HTML report): one JSON object per command::

    {"command": "swav eval knn runs/fm", "metrics": {"knn_top1@20": 85.1, ...},
     "init_metrics": {...same names...},            # only when the initial network was evaluated
     "dataset": "fashion-mnist", "checkpoint": "/abs/runs/fm/checkpoint.pt",
     "seconds": 12.3, "version": "0.1.0"}

written to ``RUN_DIR/eval/<name>.json`` for a run checkpoint, else ``./<name>.json``; ``--out``
(a ``.json`` file or a folder) overrides both.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from swav import __version__
from swav.data.datasets import EmptyDatasetError, FileListDataset, ImageFilesDataset, IMAGE_EXTENSIONS
from swav.data.loader import Batch, EpochLoader
from swav.data.multicrop import EvalTransform
from swav.eval.features import extract_features

__all__ = ["EvalData", "eval_data_for", "resolve_device", "BatchStream", "extract", "files_dataset",
           "result_path", "make_record", "write_result", "format_table", "num_classes_of", "Timer",
           "IMAGENET_MEAN", "IMAGENET_STD", "BUILTIN_STATS"]

log = logging.getLogger("swav")

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
#: per-channel mean / std of the built-in data sets (used for released weights, which carry no config)
BUILTIN_STATS = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "stl10": ([0.4467, 0.4398, 0.4066], [0.2603, 0.2566, 0.2713]),
}


def resolve_device(spec: str | None) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} but no CUDA GPU is visible; use --device cpu")
    return dev


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
    size: int | None = None  # None: native size of fixed-size built-ins, else 224
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    workers: int = 0
    download: bool = True
    min_size: int = 0
    max_side: int = 0
    batch_size: int = 256
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
        if self.size:
            return int(self.size)
        if hasattr(dataset, "get_batch"):  # in-memory built-in of one image size
            return int(dataset.images.shape[-1])
        return 224

    def transform(self, dataset) -> EvalTransform:
        """Resize + centre crop for image files; the native size for fixed-size built-ins."""
        fixed = hasattr(dataset, "get_batch")
        return EvalTransform(self.crop_size(dataset), self.mean, self.std, resize=not fixed)

    def loader(self, dataset, batch_size: int | None = None) -> EpochLoader:
        bs = min(batch_size or self.batch_size, len(dataset))
        return EpochLoader(dataset, bs, seed=0, epoch=0, shuffle=False, drop_last=False, workers=self.workers)


def eval_data_for(loaded, data: str | None = None, root: str | None = None, size: int | None = None,
                  workers: int | None = None, batch_size: int = 256) -> EvalData:
    """The data of an evaluation: the run's own source and image settings by default; ``data``
    names another source. Released files carry no data source, so they need ``data``."""
    cfg = loaded.config
    if cfg is not None:
        a = cfg.augment
        return EvalData(
            source=data or cfg.data.source, root=root if root is not None else cfg.data.root,
            in_chans=cfg.model.in_chans, size=size or a.size_crops[0],
            mean=_fit_channels(a.mean, cfg.model.in_chans), std=_fit_channels(a.std, cfg.model.in_chans),
            workers=cfg.data.workers if workers is None else workers, download=cfg.data.download,
            min_size=cfg.data.min_size, max_side=cfg.data.max_side, batch_size=batch_size)
    if not data:
        raise ValueError(f"{loaded.path} is {'an official SwAV' if loaded.kind == 'official' else 'a torchvision-layout'} file: it does not say which data it was trained "
                         "on, so give --data (a built-in name, a folder or a file list)")
    from swav.data import builtin

    in_chans = int(loaded.resnet_kwargs.get("in_chans", 3))
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
    from swav.data.datasets import _scan_images, build_dataset

    if builtin.canonical_name(source) is not None:
        return build_dataset(source, split, in_chans=in_chans, root=root)
    if os.path.isdir(source):
        paths = _scan_images(os.fspath(source), IMAGE_EXTENSIONS)
        if not paths:
            raise EmptyDatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) below folder {source!r}")
        return ImageFilesDataset(paths, None, None, in_chans, min_size, max_side, name=os.fspath(source))
    if os.path.isfile(source):
        return FileListDataset(source, in_chans, min_size, max_side)
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
            if self.on_batch is not None:
                self.on_batch(self.done, self.total)
            if len(batch):
                yield batch


def progress_printer(desc: str, enabled: bool = True, every_s: float = 5.0):
    """``on_batch`` callback writing ``desc: done/total images`` to stderr every few seconds."""
    last = [-math.inf]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if enabled and (now - last[0] >= every_s or done >= total):
            last[0] = now
            print(f"{desc}: {done}/{total} images", file=sys.stderr, flush=True)

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


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------

def result_path(loaded, name: str, out: str | os.PathLike | None = None) -> Path:
    """``--out`` (a .json file, or a folder to put ``<name>.json`` in); else ``RUN_DIR/eval/`` for a
    run checkpoint; else the current folder."""
    if out is not None:
        out = Path(out)
        return out if out.suffix == ".json" else out / f"{name}.json"
    if loaded.run_dir is not None:
        return loaded.run_dir / "eval" / f"{name}.json"
    return Path.cwd() / f"{name}.json"


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return _clean(x.item())
    return x


def make_record(command: str, metrics: dict, init_metrics: dict | None, dataset: str, checkpoint,
                seconds: float) -> dict:
    rec = {"command": command,
           "metrics": {k: _clean(float(v)) for k, v in metrics.items()}}
    if init_metrics is not None:
        rec["init_metrics"] = {k: _clean(float(v)) for k, v in init_metrics.items()}
    rec.update({"dataset": str(dataset), "checkpoint": str(Path(checkpoint).resolve()),
                "seconds": round(float(seconds), 3), "version": __version__})
    return rec


def write_result(record: dict, path: Path) -> Path:
    """Write ``record`` as JSON atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    v = float(v)
    if unit == "count" and v.is_integer():
        return f"{int(v)}"
    return f"{v:.2f}" if abs(v) >= 1 or unit == "%" or v == 0 else f"{v:.4f}"


def format_table(title: str, metrics: dict, init_metrics: dict | None = None, units: dict | None = None) -> str:
    """A plain-text table: one row per metric, the pretrained value and (when given) the value at
    initialisation and the difference."""
    units = units or {}
    names = list(metrics)
    w = max([len(n) + 6 for n in names] + [len("metric")])
    head = f"{'metric':<{w}} {'pretrained':>11}"
    if init_metrics is not None:
        head += f" {'at init':>11} {'gain':>9}"
    lines = [title, head, "-" * len(head)]
    for n in names:
        u = units.get(n) or ("%" if "top1" in n or "top5" in n else "")
        label = n + (f" ({u})" if u else "")
        row = f"{label:<{w}} {_fmt(metrics[n], u):>11}"
        if init_metrics is not None:
            iv = init_metrics.get(n)
            gain = None if iv is None else float(metrics[n]) - float(iv)
            row += f" {_fmt(iv, u):>11} {('+' if gain is not None and gain >= 0 else '') + _fmt(gain, u):>9}"
        lines.append(row)
    return "\n".join(lines)


def iter_chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)

"""Few-label fine-tuning: the whole network trained on a class-balanced 1 % or 10 % of the labels.

The recipe follows the official semi-supervised evaluation: a new linear head (N(0, 0.01), zero
bias) on the pooled features, SGD momentum 0.9 without weight decay, separate learning rates for
the trunk and the head, 20 epochs with the learning rates times 0.2 at epochs 12 and 16,
RandomResizedCrop + flip on the training images. Two defaults differ from the official ones
(ImageNet, ResNet-50), because they fail on small data and small networks:

* head learning rate 0.2 at 1 % as at 10 % (official 5 at 1 %): on Fashion-MNIST with the preset's
  ResNet-18 a head lr of 5 leaves both the pretrained and the random network near chance
  (11-16 % top-1 after 10 epochs, against 57-64 % with 0.2);
* batch size ``min(256, max(32, n // 16))`` for n labelled images (official 256): 1 % of a 60,000
  image set is 600 images, 3 steps per epoch at 256, too few to fit anything in 20 epochs. The score is the top-1 /
top-5 of the fine-tuned network on the test split; run on the pretrained backbone and on the same
backbone at initialisation with the same labels, it tells what pretraining is worth.

The labelled subset is drawn per class (``round(fraction * n_class)``, at least 1) with a seeded
generator and saved as a text file so that other runs can reuse it::

    # swav few-label subset: source=fashion-mnist split=train percent=1 seed=0 images=600
    12<TAB>3              (a built-in data set: dataset index, label)
    /data/cats/1.jpg<TAB>0  (image files: path, label)
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swav.atomic import write_bytes_atomic
from swav.data.datasets import ImageFilesDataset, TensorImageDataset
from swav.data.loader import EpochLoader
from swav.eval.features import extract_features
from swav.eval.linear import probe_augmentation, topk_accuracy
from swav.progress import Progress

__all__ = ["balanced_subset", "write_subset_file", "read_subset_file", "subset_dataset", "finetune",
           "default_lrs", "default_batch_size"]

log = logging.getLogger("swav")


def default_lrs(percent: float) -> tuple[float, float]:
    """(trunk lr, head lr): 1 % -> (0.02, 0.2), 10 % (and more) -> (0.01, 0.2). The official head lr
    at 1 % is 5 (see the module docstring for why it is not the default)."""
    return (0.02, 0.2) if percent < 5 else (0.01, 0.2)


def default_batch_size(n: int) -> int:
    """``min(256, max(32, n // 16))``: at least about 16 steps per epoch on small subsets."""
    return min(256, max(32, n // 16))


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: ``max(1, round(fraction * n_c))`` random samples
    of each class c (seeded; the same arguments always give the same subset)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        k = max(1, int(round(fraction * members.numel())))
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    return torch.sort(torch.cat(chosen)).values


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append({"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def write_subset_file(path: str | os.PathLike, dataset, indices: torch.Tensor, header: str = "") -> Path:
    """One line per labelled image: ``index<TAB>label`` for in-memory built-ins, ``path<TAB>label``
    for image files (tabs, newlines and backslashes in paths are backslash-escaped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# swav few-label subset: {header}".rstrip()] if header else []
    labels = dataset.labels
    for i in indices.tolist():
        key = str(i) if isinstance(dataset, TensorImageDataset) else _escape(dataset.path(i))
        lines.append(f"{key}\t{int(labels[i])}")
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"), durable=False)
    return path


def read_subset_file(path: str | os.PathLike, dataset) -> torch.Tensor:
    """Indices into ``dataset`` of a file written by :func:`write_subset_file`; every entry must
    exist in the data set with the same label."""
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    by_path = None if isinstance(dataset, TensorImageDataset) else {dataset.path(i): i for i in range(len(dataset))}
    out, problems = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        key, _, lab = line.rpartition("\t")
        if not key:
            problems.append(f"line {lineno}: expected KEY<TAB>LABEL")
            continue
        if by_path is None:
            if not key.isdigit() or int(key) >= len(dataset):
                problems.append(f"line {lineno}: {key!r} is not an index below {len(dataset)}")
                continue
            i = int(key)
        else:
            i = by_path.get(_unescape(key))
            if i is None:
                problems.append(f"line {lineno}: {_unescape(key)!r} is not in the data set")
                continue
        if int(dataset.labels[i]) != int(lab):
            problems.append(f"line {lineno}: label {lab} but the data set says {int(dataset.labels[i])}")
            continue
        out.append(i)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
        raise ValueError(f"subset file {path} does not match the data set: {shown}")
    if not out:
        raise ValueError(f"subset file {path} lists no image")
    return torch.tensor(sorted(set(out)), dtype=torch.int64)


def subset_dataset(dataset, indices: torch.Tensor):
    """The images ``indices`` of ``dataset`` as a data set of their own (labels kept)."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images.index_select(0, idx), dataset.labels.index_select(0, idx),
                                  dataset.classes, dataset.name)
    if isinstance(dataset, ImageFilesDataset):
        return ImageFilesDataset([dataset.path(i) for i in idx.tolist()], dataset.labels.index_select(0, idx),
                                 dataset.classes, name=dataset.name, **dataset.decode_options)
    raise TypeError(f"unsupported data set type {type(dataset).__name__}")


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, seed: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.backbone(x))


def finetune(backbone: nn.Module, train_set, test_set, eval_data, device, num_classes: int, *,
             epochs: int = 20, lr_trunk: float = 0.02, lr_head: float = 0.2, batch_size: int | None = None,
             milestones: tuple[float, ...] = (0.6, 0.8), gamma: float = 0.2, min_scale: float = 0.08,
             seed: int = 0, stream=None, prefix: str = "finetune") -> dict[str, float]:
    """Fine-tune a copy of ``backbone`` with a new linear head on ``train_set`` (all its images are
    labelled) and return its top-1 / top-5 in percent on ``test_set``. ``milestones`` are fractions
    of ``epochs`` (0.6, 0.8 = epochs 12 and 16 of 20); ``batch_size=None`` picks
    :func:`default_batch_size`. ``backbone`` itself is left unchanged."""
    device = torch.device(device)
    net = _Classifier(copy.deepcopy(backbone), int(backbone.num_features), num_classes, seed).to(device)
    opt = torch.optim.SGD([{"params": net.backbone.parameters(), "lr": lr_trunk, "base": lr_trunk},
                           {"params": net.head.parameters(), "lr": lr_head, "base": lr_head}],
                          lr=lr_trunk, momentum=0.9, weight_decay=0.0)
    size = eval_data.crop_size(train_set)
    augment = probe_augmentation(size, eval_data.mean, eval_data.std, eval_data.in_chans, min_scale).to(device)
    n = len(train_set)
    bs = min(batch_size or default_batch_size(n), n)
    # a last batch of 1 image is skipped below (BatchNorm in train mode needs 2)
    loader = EpochLoader(train_set, bs, seed=seed, epoch=0, shuffle=True, drop_last=False,
                         workers=eval_data.workers)
    marks = [int(round(m * epochs)) for m in milestones]
    gen = torch.Generator(device=device).manual_seed(seed)
    bar = Progress(epochs, prefix, unit="epochs", enabled=False)  # the log lines' rate and time left
    for epoch in range(epochs):
        factor = gamma ** sum(epoch >= m for m in marks)
        for g in opt.param_groups:
            g["lr"] = g["base"] * factor
        loader.set_epoch(epoch)
        net.train()
        losses = []
        for batch in (stream(loader) if stream is not None else loader):
            if len(batch) < 2:
                continue
            images = batch.images.to(device, non_blocking=True)
            x = augment(images, batch.sizes.to(device), augment.sample_params(images.shape[0], gen))[0]
            loss = F.cross_entropy(net(x), batch.labels.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{prefix}: the loss became {float(loss.detach())} at epoch {epoch + 1}; "
                                         "lower --lr-trunk / --lr-head")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        bar.set(epoch + 1)
        if epoch == 0 or (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            log.info("%s | loss %.4f", bar.line(), sum(losses) / max(1, len(losses)))
    test_loader = eval_data.loader(test_set)
    logits, labels, _ = extract_features(net, stream(test_loader) if stream is not None else test_loader,
                                         eval_data.transform(test_set).to(device), device)
    top1, top5 = topk_accuracy(logits, labels)
    if not math.isfinite(top1):
        raise FloatingPointError(f"{prefix}: non-finite accuracy")
    return {f"{prefix}_top1": top1, f"{prefix}_top5": top5}

"""Linear probe: a linear classifier trained on the frozen backbone's pooled features.

The official SwAV recipe: backbone frozen and in eval mode, a linear layer with weights drawn from
N(0, 0.01) and zero bias, SGD momentum 0.9, weight decay 1e-6, lr 0.3 with a cosine schedule to 0,
batch 256, 100 epochs, RandomResizedCrop + horizontal flip on the training split only, resize +
centre crop for the test split. Top-1 / top-5 is measured after every epoch; the last and the best
are reported.

Training features come from a *feature source*:

* :class:`AugmentedFeatures` runs the backbone on freshly augmented images every epoch (the official
  recipe, the slowest);
* :class:`CachedFeatures` holds precomputed features, either V augmented views of each image
  (:func:`cache_augmented_views`; epoch e uses view e mod V) or one plain, un-augmented view; then
  100 epochs take seconds.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from swav.data.loader import EpochLoader
from swav.data.multicrop import MultiCrop
from swav.eval.features import extract_features
from swav.progress import Progress

__all__ = ["FeatureSource", "CachedFeatures", "AugmentedFeatures", "train_linear_classifier",
           "cache_augmented_views", "probe_augmentation", "topk_accuracy"]

log = logging.getLogger("swav")


class FeatureSource(Protocol):
    n: int
    dim: int

    def epoch_batches(self, epoch: int, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
        """(features (B, D), labels (B,)) batches of one epoch, in a random order."""


class CachedFeatures:
    """Precomputed features: ``(N, D)`` or ``(V, N, D)`` (V views; epoch e uses view e mod V)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        if features.dim() == 2:
            features = features[None]
        if features.dim() != 3 or features.shape[1] != labels.shape[0]:
            raise ValueError(f"features {tuple(features.shape)} do not match labels {tuple(labels.shape)}")
        self.features = features.float()
        self.labels = labels.long()
        self.views, self.n, self.dim = (int(s) for s in features.shape)

    def epoch_batches(self, epoch, batch_size, generator):
        feats = self.features[epoch % self.views]
        perm = torch.randperm(self.n, generator=generator)
        for s in range(0, self.n, batch_size):
            idx = perm[s:s + batch_size]
            yield feats[idx], self.labels[idx]


def probe_augmentation(size: int, mean, std, in_chans: int, min_scale: float = 0.08) -> MultiCrop:
    """RandomResizedCrop(size, scale=(min_scale, 1)) + horizontal flip + normalisation: the
    training augmentation of the linear probe and of fine-tuning (no colour jitter, no blur)."""
    return MultiCrop([size], [1], [min_scale], [1.0], flip_prob=0.5, jitter_strength=0.0, jitter_prob=0.0,
                     grayscale_prob=0.0, blur_prob=0.0, mean=mean, std=std, in_chans=in_chans)


def _augmenting_transform(augment: MultiCrop, generator: torch.Generator):
    def transform(images, sizes):
        params = augment.sample_params(images.shape[0], generator)
        return augment(images, sizes, params)[0]
    return transform


class AugmentedFeatures:
    """Features of freshly augmented training images, computed batch by batch every epoch."""

    def __init__(self, backbone: nn.Module, dataset, augment: MultiCrop, device, dim: int, seed: int = 0,
                 workers: int = 0, stream=None):
        self.backbone, self.dataset, self.device = backbone, dataset, torch.device(device)
        self.augment = augment.to(self.device)
        self.n, self.dim, self.seed, self.workers = len(dataset), int(dim), int(seed), int(workers)
        self.stream = stream  # BatchStream-like wrapper factory (skips unusable files), or None

    def epoch_batches(self, epoch, batch_size, generator):
        loader = EpochLoader(self.dataset, min(batch_size, self.n), seed=self.seed, epoch=epoch, shuffle=True,
                             drop_last=False, workers=self.workers)
        batches = self.stream(loader) if self.stream is not None else loader
        aug_gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        transform = _augmenting_transform(self.augment, aug_gen)
        for batch in batches:
            if len(batch) == 0:
                continue
            feats, labels, _ = extract_features(self.backbone, [batch], transform, self.device)
            yield feats, labels


def cache_augmented_views(backbone: nn.Module, batches_fn, augment: MultiCrop, device, views: int,
                          seed: int = 0):
    """``views`` augmented feature sets of the same images: ``(V, N, D)`` features and ``(N,)`` labels.
    ``batches_fn()`` returns a fresh iterable of the dataset's batches (fixed order)."""
    device = torch.device(device)
    augment = augment.to(device)
    out, labels, idx0 = [], None, None
    for v in range(views):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + v)
        feats, labels, idx = extract_features(backbone, batches_fn(), _augmenting_transform(augment, gen), device)
        if idx0 is not None and not torch.equal(idx, idx0):
            raise RuntimeError("augmented views cover different images (a file became unreadable meanwhile?)")
        idx0 = idx
        out.append(feats)
        log.info("linear probe: cached augmented view %d/%d (%d images)", v + 1, views, feats.shape[0])
    return torch.stack(out), labels


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Top-k accuracies in percent (k clipped to the number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == targets[:, None]
    return [100.0 * hit[:, :min(k, kmax)].any(dim=1).float().mean().item() for k in ks]


def train_linear_classifier(train: FeatureSource, test_features: torch.Tensor, test_labels: torch.Tensor,
                            num_classes: int, *, epochs: int = 100, lr: float = 0.3, batch_size: int = 256,
                            weight_decay: float = 1e-6, momentum: float = 0.9, seed: int = 0,
                            device="cpu", prefix: str = "linear") -> dict[str, float]:
    """Train a linear layer on ``train`` features and measure it on the test features after every
    epoch. Returns ``{prefix_top1, prefix_top5}`` (last epoch) and ``{prefix_best_top1,
    prefix_best_top5}`` (best epoch for each), in percent."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(train.dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch.Generator(device=device).manual_seed(seed))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(train.n / batch_size))
    total = epochs * steps_per_epoch
    test_x, test_y = test_features.float().to(device), test_labels.long().to(device)
    best1 = best5 = -1.0
    top1 = top5 = float("nan")
    step = 0
    bar = Progress(epochs, prefix, unit="epochs", enabled=False)  # the log lines' rate and time left
    for epoch in range(epochs):
        head.train()
        for x, y in train.epoch_batches(epoch, batch_size, gen):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
            loss = F.cross_entropy(head(x.to(device).float()), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            top1, top5 = topk_accuracy(head(test_x), test_y)
        best1, best5 = max(best1, top1), max(best5, top5)
        bar.set(epoch + 1)
        if epoch == 0 or (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
            log.info("%s | loss %.4f, test top-1 %.2f %%, top-5 %.2f %%", bar.line(), loss.item(), top1, top5)
    return {f"{prefix}_top1": top1, f"{prefix}_top5": top5,
            f"{prefix}_best_top1": best1, f"{prefix}_best_top5": best5}

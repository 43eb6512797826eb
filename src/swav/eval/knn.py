"""Weighted k-nearest-neighbour classification on frozen features.

The weighted vote of Wu et al. (InstDisc, 2018), as used by DINO: features
are L2-normalised, the k training samples with the highest cosine similarity
vote for their class with weight ``exp(sim / T)``.

Ties are broken deterministically towards the lower class index (for top-1
and top-5).  Ties between equally similar *neighbours* at the k-th place are
resolved by ``torch.topk`` (unspecified which one is kept).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_accuracy"]


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    temperature: float,
    chunk_size: int,
) -> None:
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(
            f"features must be 2-D (N, D); got train {tuple(train_features.shape)}, test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature sizes differ: train D={train_features.shape[1]}, test D={test_features.shape[1]}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("no training features: the kNN classifier needs at least one training sample")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"train labels span [{lo}, {hi}] but num_classes={num_classes}")


def _knn_topk(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    chunk_size: int,
):
    """Yield (start, sims (c, k) sorted descending, indices (c, k)) per chunk of test queries."""
    train = F.normalize(train_features.float(), dim=1)
    device = train.device
    for start in range(0, test_features.shape[0], chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        sims, idx = (q @ train.T).topk(k, dim=1, largest=True, sorted=True)
        yield start, sims, idx


def _vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``(M, num_classes)`` (float32, on ``train_features.device``).

    ``k`` larger than the number of training samples N is clipped to N.
    Memory per chunk is about ``chunk_size * N * 4`` bytes (the similarity
    block), so lower ``chunk_size`` for very large training sets.
    """
    _check_inputs(train_features, train_labels, test_features, num_classes, temperature, chunk_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_features.shape[0])
    labels = train_labels.to(train_features.device, torch.int64)
    out = torch.empty(test_features.shape[0], num_classes, dtype=torch.float32, device=train_features.device)
    for start, sims, idx in _knn_topk(train_features, test_features, k, chunk_size):
        out[start : start + sims.shape[0]] = _vote(sims, labels[idx], num_classes, temperature)
    return out


def _rank_of_true(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of the true class; equal scores rank the lower class index first."""
    true = scores.gather(1, targets[:, None])
    classes = torch.arange(scores.shape[1], device=scores.device)
    above = (scores > true) | ((scores == true) & (classes[None, :] < targets[:, None]))
    return above.sum(dim=1)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float | str]:
    """Top-1 / top-5 kNN accuracy in percent for each k in ``ks``.

    Returns ``{"knn_top1@20": %, "knn_top5@20": %, "knn_top1@200": %, ...}``,
    keyed by the requested k.  When a k exceeds the number of training
    samples it is clipped, and a ``"note"`` entry (a string) says so.  With
    fewer than 5 classes top-5 accuracy is 100%.
    """
    _check_inputs(train_features, train_labels, test_features, num_classes, temperature, chunk_size)
    m = test_features.shape[0]
    if m == 0:
        raise ValueError("no test features to evaluate")
    if test_labels.shape != (m,):
        raise ValueError(f"test_labels must have shape ({m},), got {tuple(test_labels.shape)}")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    n = train_features.shape[0]
    used = {k: min(k, n) for k in ks}
    k_max = max(used.values())
    device = train_features.device
    labels = train_labels.to(device, torch.int64)
    targets_all = test_labels.to(device, torch.int64)
    correct1 = {k: torch.zeros((), dtype=torch.int64, device=device) for k in ks}
    correct5 = {k: torch.zeros((), dtype=torch.int64, device=device) for k in ks}
    for start, sims, idx in _knn_topk(train_features, test_features, k_max, chunk_size):
        targets = targets_all[start : start + sims.shape[0]]
        neighbour_labels = labels[idx]
        for k in ks:
            kk = used[k]
            scores = _vote(sims[:, :kk], neighbour_labels[:, :kk], num_classes, temperature)
            rank = _rank_of_true(scores, targets)
            correct1[k] += (rank < 1).sum()
            correct5[k] += (rank < 5).sum()
    result: dict[str, float | str] = {}
    for k in ks:
        result[f"knn_top1@{k}"] = 100.0 * int(correct1[k]) / m
        result[f"knn_top5@{k}"] = 100.0 * int(correct5[k]) / m
    clipped = [k for k in ks if used[k] != k]
    if clipped:
        result["note"] = f"k={', '.join(map(str, clipped))} clipped to the {n} training samples"
    return result

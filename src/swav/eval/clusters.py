"""The prototypes as an unsupervised classifier, and the usual clustering scores.

Each image is assigned to a prototype: the argmax of its scores ``z . c_k`` (z the L2-normalised
projection, c_k the L2-normalised prototypes, as in training), or, with ``method="sinkhorn"``, the
argmax of the Sinkhorn codes computed over the whole set at once (which spreads the images evenly
over the prototypes, as training does within a batch).

Scores against the true labels (all computed from the contingency table):

* NMI: mutual information / arithmetic mean of the two entropies (scikit-learn's default);
  1 when both partitions are trivial;
* ARI: the adjusted Rand index (Hubert & Arabie);
* purity: each cluster votes for its majority class (many clusters may share a class);
* Hungarian accuracy: the best one-to-one matching of clusters to classes (unmatched clusters
  count as wrong; with many more prototypes than classes it is bounded by the largest clusters);
* prototypes used: the number of prototypes that received at least one image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["contingency_table", "nmi", "ari", "purity", "hungarian_accuracy", "cluster_metrics",
           "assign", "PrototypeScores"]


def contingency_table(pred, labels) -> np.ndarray:
    """(clusters used x classes present) counts; rows and columns of empty clusters/classes dropped."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.size} predictions for {labels.size} labels")
    if pred.size == 0:
        raise ValueError("no samples")
    _, p = np.unique(pred, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    table = np.zeros((p.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (p, y), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(pred, labels) -> float:
    t = contingency_table(pred, labels).astype(np.float64)
    n = t.sum()
    rows, cols = t.sum(1), t.sum(0)
    if t.shape[0] == 1 and t.shape[1] == 1:
        return 1.0
    nz = t > 0
    mi = float((t[nz] / n * np.log(t[nz] * n / np.outer(rows, cols)[nz])).sum())
    h = 0.5 * (_entropy(rows) + _entropy(cols))
    return 0.0 if h <= 0 else max(0.0, min(1.0, mi / h))


def _comb2(x: np.ndarray | float):
    return np.asarray(x, dtype=np.float64) * (np.asarray(x, dtype=np.float64) - 1) / 2


def ari(pred, labels) -> float:
    t = contingency_table(pred, labels)
    n = t.sum()
    sum_cells = float(_comb2(t).sum())
    sum_rows, sum_cols = float(_comb2(t.sum(1)).sum()), float(_comb2(t.sum(0)).sum())
    total = float(_comb2(n))
    if total == 0:
        return 1.0
    expected = sum_rows * sum_cols / total
    max_index = 0.5 * (sum_rows + sum_cols)
    if max_index == expected:  # both partitions trivial (one cluster, or all singletons), identical
        return 1.0
    return (sum_cells - expected) / (max_index - expected)


def purity(pred, labels) -> float:
    """Fraction in [0, 1]."""
    t = contingency_table(pred, labels)
    return float(t.max(1).sum() / t.sum())


def hungarian_accuracy(pred, labels) -> float:
    """Fraction in [0, 1] of samples whose cluster is matched to their class by the best
    one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    t = contingency_table(pred, labels)
    r, c = linear_sum_assignment(t, maximize=True)
    return float(t[r, c].sum() / t.sum())


def cluster_metrics(pred, labels) -> dict[str, float]:
    """NMI and ARI (fractions), purity and Hungarian accuracy (percent), prototypes used (count)."""
    pred = np.asarray(pred)
    return {"nmi": nmi(pred, labels), "ari": ari(pred, labels),
            "purity": 100.0 * purity(pred, labels), "hungarian_acc": 100.0 * hungarian_accuracy(pred, labels),
            "prototypes_used": float(len(np.unique(pred)))}


@torch.no_grad()
def assign(scores: torch.Tensor, method: str = "argmax", epsilon: float = 0.05, iterations: int = 3):
    """(prototype (N,) int64, score (N,) float) for each row of ``scores`` (N, K). ``score`` is the
    cosine similarity to the chosen prototype."""
    scores = scores.float()
    if method == "argmax":
        best = scores.argmax(dim=1)
    elif method == "sinkhorn":
        from swav.sinkhorn import sinkhorn

        best = sinkhorn(scores, epsilon, iterations).argmax(dim=1)
    else:
        raise ValueError(f"unknown assignment method {method!r}; use argmax or sinkhorn")
    return best, scores.gather(1, best[:, None])[:, 0]


class PrototypeScores(nn.Module):
    """images -> cosine scores (N, K) against one prototype head of a SwAVModel (eval mode)."""

    def __init__(self, model, head: int = 0):
        super().__init__()
        self.model = model
        weights = model.prototypes.weights()
        if not 0 <= head < len(weights):
            raise ValueError(f"prototype head {head} does not exist; the model has {len(weights)}")
        self.head = head

    def forward(self, x):
        z, _ = self.model.forward_head(self.model.backbone(x))
        if not self.model.normalize:
            z = F.normalize(z, dim=1)
        c = F.normalize(self.model.prototypes.weights()[self.head].float(), dim=1)
        return z.float() @ c.t()

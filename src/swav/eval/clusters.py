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

__all__ = ["contingency_table", "nmi", "ari", "purity", "hungarian_accuracy", "max_weight_matching",
           "cluster_metrics",
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


def max_weight_matching(weights) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of a one-to-one matching of maximum total weight of an (R, C) matrix:
    min(R, C) pairs, rows ascending (what ``scipy.optimize.linear_sum_assignment(w, maximize=True)``
    returns, computed here without scipy).

    The Hungarian algorithm in its shortest-augmenting-path form (Jonker & Volgenant 1987; the
    variant of Crouse 2016 that scipy uses): with n = min(R, C) <= m = max(R, C) and costs
    a_ij = max(w) - w_ij >= 0, each row in turn is joined to the matching by a Dijkstra search over
    reduced costs a_ij - u_i - v_j >= 0 that ends at a free column (a free one first among equal
    distances), the path is flipped, and the duals u (n,), v (m,) move so that matched pairs keep
    reduced cost 0. Exact for integer weights (float64 sums of counts); O(n^2 m) at worst, each
    search step one vectorised pass over the m columns.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be a 2-D matrix, got shape {w.shape}")
    if w.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    flip = w.shape[0] > w.shape[1]
    a = np.ascontiguousarray((w.max() - w).T if flip else w.max() - w)  # (n, m), n <= m
    n, m = a.shape
    u, v = np.zeros(n), np.zeros(m)
    col_of = np.full(n, -1, dtype=np.int64)  # column matched to each row
    row_of = np.full(m, -1, dtype=np.int64)  # row matched to each column
    for i in range(n):
        _augment(a, i, u, v, col_of, row_of)
    rows, cols = np.arange(n, dtype=np.int64), col_of
    if flip:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def _augment(a: np.ndarray, start: int, u: np.ndarray, v: np.ndarray, col_of: np.ndarray,
             row_of: np.ndarray) -> None:
    """Join row ``start`` to the matching: the shortest path over reduced costs from it to a free
    column, the dual update, then the path flipped (all in place)."""
    m = a.shape[1]
    dist = np.full(m, np.inf)  # shortest path cost to each column found so far
    via = np.full(m, -1, dtype=np.int64)  # the row before each column on that path
    scanned_cols = np.zeros(m, dtype=bool)
    scanned_rows = []
    i, low, sink = start, 0.0, -1
    while sink < 0:
        scanned_rows.append(i)
        reduced = low + a[i] - u[i] - v  # (m,)
        better = ~scanned_cols & (reduced < dist)
        dist[better] = reduced[better]
        via[better] = i
        open_dist = np.where(scanned_cols, np.inf, dist)
        low = open_dist.min()
        ties = np.flatnonzero(open_dist == low)
        free = ties[row_of[ties] < 0]
        j = int(free[0]) if len(free) else int(ties[0])
        scanned_cols[j] = True
        if row_of[j] < 0:
            sink = j
        else:
            i = int(row_of[j])
    rows = np.asarray(scanned_rows[1:], dtype=np.int64)
    u[start] += low
    u[rows] += low - dist[col_of[rows]]
    v[scanned_cols] -= low - dist[scanned_cols]
    j = sink
    while True:  # flip the path: each column on it takes the row before it
        i = int(via[j])
        row_of[j] = i
        col_of[i], j = j, int(col_of[i])
        if i == start:
            break


def hungarian_accuracy(pred, labels) -> float:
    """Fraction in [0, 1] of samples whose cluster is matched to their class by the best
    one-to-one matching (:func:`max_weight_matching` of the contingency table)."""
    t = contingency_table(pred, labels)
    r, c = max_weight_matching(t)
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

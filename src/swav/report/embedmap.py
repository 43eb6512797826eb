"""A 2-D map of embeddings: L2 normalisation, PCA to 50 dimensions, then scikit-learn's t-SNE."""
from __future__ import annotations

import os

import numpy as np

__all__ = ["tsne_2d", "spread_points"]


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, F) features -> (N, 2) t-SNE coordinates (cosine geometry: features are L2-normalised first)."""
    from swav.extras import require

    PCA = require("sklearn.decomposition", "the report's embedding map").PCA
    TSNE = require("sklearn.manifold", "the report's embedding map").TSNE
    threadpool_limits = require("threadpoolctl", "the report's embedding map").threadpool_limits

    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"a t-SNE map needs at least 5 points, got {n}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dims = min(50, x.shape[1], n)
    if x.shape[1] > dims:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # t-SNE's OpenMP threads spin while they wait: on a small or busy machine one thread is several
    # times faster than all of them (measured: 128 points, 2 busy cores, 28 s vs 0.9 s).
    with threadpool_limits(limits=max(1, min(8, (os.cpu_count() or 1) // 2))):
        return tsne.fit_transform(x).astype(np.float64)


def spread_points(xy: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """``k`` row indices of ``xy`` spread over the map (greedy farthest-point sampling)."""
    n = len(xy)
    if n == 0 or k <= 0:
        return []
    k = min(k, n)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    dist = np.linalg.norm(xy - xy[chosen[0]], axis=1)
    while len(chosen) < k:
        nxt = int(dist.argmax())
        if dist[nxt] <= 0:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(xy - xy[nxt], axis=1))
    return chosen

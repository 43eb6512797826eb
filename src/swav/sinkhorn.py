"""Codes from prototype scores by Sinkhorn-Knopp (SwAV, Caron et al. 2020, Sec. 3.1 and Alg. 1).

The paper solves, for a batch of B feature/prototype scores S = Z^T C (B x K),

    max_Q  Tr(Q^T C^T Z) + eps * H(Q)   over the transportation polytope
    Q 1_B = 1_K / K   (each prototype receives 1/K of the mass)
    Q^T 1_K = 1_B / B (each sample carries 1/B of the mass)

whose solution is Q* = Diag(u) exp(S^T / eps) Diag(v), with u, v found by a few alternating
normalisations. The official code does this in linear space (``exp(scores / eps)``), which
overflows float32 as soon as ``1 / eps`` exceeds ~88 for cosine scores (eps < ~0.0113) and
underflows whole prototypes to zero for small eps. We run exactly the same iterations in the log
domain: every normalisation ``Q /= sum(Q)`` becomes ``log Q -= logsumexp(log Q)``, which is stable
for any eps and equal to the official result wherever the official one is finite.

Across processes, prototypes see samples from every rank: the per-prototype (row) sums are
reduced over all ranks at every iteration, the per-sample (column) normalisation stays local,
exactly as the official ``distributed_sinkhorn``. Imports only torch.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["sinkhorn", "sinkhorn_reference"]


def _group_size(group) -> int:
    """Number of ranks to reduce over, or 1 outside any process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _global_logsumexp_over_samples(log_q: torch.Tensor, group, world: int) -> torch.Tensor:
    """log sum_b exp(log_q[b, k]) over the samples of every rank -> (K,).

    Stable: shift by the per-prototype maximum over all ranks, so the largest term is exp(0) = 1
    and the sum is >= 1 (never log 0) and finite.
    """
    m = log_q.amax(dim=0)  # (K,) local max over samples
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(log_q - m).sum(dim=0)  # (K,)
    if world > 1:
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    group=None,
) -> torch.Tensor:
    """Soft codes Q from scores, the official SwAV Sinkhorn-Knopp, computed in the log domain.

    Args:
        scores: (B_local, K) prototype scores z^T c_k of this rank's samples (queue rows first if a
            queue is used). Any float dtype; the computation runs in float32 (float64 stays float64).
        epsilon: entropy weight eps of the paper (0.05 in the paper). Any eps > 0 is stable here.
        iterations: number of Sinkhorn-Knopp iterations (3 in the paper).
        group: process group whose ranks share the prototypes. When a default process group is
            initialised, the prototype (row) sums are all-reduced over ``group`` (None = all
            ranks), as the official code does; outside any process group nothing is reduced.

    Returns:
        codes: (B_local, K) float32 (or float64), each row sums to 1; with B = total samples over
        ranks, each column (prototype) sums to about B / K over all ranks.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape (B, K), got {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn needs at least 1 iteration, got {iterations}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    world = _group_size(group)

    # log Q^T, shape (B_local, K): we keep samples as rows; the official Q is its transpose.
    log_q = scores.to(dtype) / epsilon
    num_k = log_q.shape[1]
    num_b = torch.tensor(float(log_q.shape[0]), dtype=dtype, device=log_q.device)
    if world > 1:  # B = all samples over ranks (equal to B_local * world_size for equal batches)
        dist.all_reduce(num_b, op=dist.ReduceOp.SUM, group=group)
    log_k = math.log(num_k)
    log_b = torch.log(num_b)
    # The official first step Q /= sum(Q) only rescales Q by a constant, which the first row
    # normalisation removes again: it is mathematically a no-op and is skipped.
    for it in range(iterations):
        # rows (prototypes): Q_k. /= sum_b Q_kb over all ranks; Q /= K
        log_q = log_q - (_global_logsumexp_over_samples(log_q, group, world) + log_k)
        if it < iterations - 1:
            # columns (samples, local): Q_.b /= sum_k Q_kb; Q /= B
            log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + log_b)
    # The last column normalisation followed by Q *= B is a softmax over prototypes: rows sum to 1.
    return torch.softmax(log_q, dim=1)


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The official linear-space algorithm, single process, in the dtype of ``scores``.

    Kept as the plain form the benchmarks and tests compare against: it overflows in float32 for
    small eps (use float64 scores there).
    """
    q = torch.exp(scores / epsilon).t()  # (K, B)
    num_b = q.shape[1]
    num_k = q.shape[0]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / num_k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / num_b
    q = q * num_b
    return q.t()

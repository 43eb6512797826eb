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


# Largest dynamic range (max - min of scores / eps, over all ranks) for which the scaling form
# runs in linear space: exp(-range) stays a normal number and the scaling vectors, which stay
# within about exp(+-range) times B and K, stay finite (float32 normal range is e^+-87).
_LINEAR_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    group=None,
    linear: bool | None = None,
) -> torch.Tensor:
    """Soft codes Q from scores, the official SwAV Sinkhorn-Knopp, computed stably.

    Args:
        scores: (B_local, K) prototype scores z^T c_k of this rank's samples (queue rows first if a
            queue is used). Any float dtype; the computation runs in float32 (float64 stays float64).
        epsilon: entropy weight eps of the paper (0.05 in the paper). Any eps > 0 is stable here.
        iterations: number of Sinkhorn-Knopp iterations (3 in the paper).
        group: process group whose ranks share the prototypes. When a default process group is
            initialised, the prototype (row) sums are all-reduced over ``group`` (None = all
            ranks), as the official code does; outside any process group nothing is reduced.
        linear: how to compute. The log domain (``False``) is exact for any eps and never needs
            the host. The scaling form (``True`` where safe) exponentiates once, shifted by the
            global maximum, and iterates on two scaling vectors with matrix-vector products (no
            further exp): several times faster, and used only when ``max - min`` of ``scores /
            eps`` over all ranks is small enough that nothing underflows (it is 40 for cosine
            scores at the paper's eps 0.05). Deciding that reads one number on the host, so
            ``None`` (the default) chooses the scaling form when safe on CPU, where that read is
            free, and the log domain elsewhere (no host-device synchronisation on a GPU).

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

    num_b = torch.full((), float(scores.shape[0]), dtype=dtype, device=scores.device)  # a fill, not a copy
    if linear is None:
        linear = scores.device.type == "cpu"
    if linear:
        # global max and -min in one reduction: the shift of the exponent and the range test
        lo, hi = torch.aminmax(scores)
        ext = torch.stack([hi.to(dtype), -lo.to(dtype), num_b])
        if world > 1:
            dist.all_reduce(ext[:2], op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(ext[2:], op=dist.ReduceOp.SUM, group=group)
        hi, neg_lo, n_b = ext.tolist()  # the one host read
        if (hi + neg_lo) / epsilon <= _LINEAR_RANGE[dtype]:
            return _sinkhorn_scaling(scores, epsilon, hi, dtype, n_b, iterations, group, world)
        num_b.fill_(n_b)
    elif world > 1:  # B = all samples over ranks (equal to B_local * world_size for equal batches)
        dist.all_reduce(num_b, op=dist.ReduceOp.SUM, group=group)
    # log Q^T, shape (B_local, K): we keep samples as rows; the official Q is its transpose.
    log_q = scores.to(dtype) / epsilon  # a new tensor: updated in place below
    num_k = log_q.shape[1]
    log_k = math.log(num_k)
    log_b = torch.log(num_b)
    # The official first step Q /= sum(Q) only rescales Q by a constant, which the first row
    # normalisation removes again: it is mathematically a no-op and is skipped.
    for it in range(iterations):
        # rows (prototypes): Q_k. /= sum_b Q_kb over all ranks; Q /= K
        log_q.sub_(_global_logsumexp_over_samples(log_q, group, world).add_(log_k))
        if it < iterations - 1:
            # columns (samples, local): Q_.b /= sum_k Q_kb; Q /= B
            log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True).add_(log_b))
    # The last column normalisation followed by Q *= B is a softmax over prototypes: rows sum to 1.
    return torch.softmax(log_q, dim=1)


# rows per block of the scaling form: a block of P (about 1 MiB) stays in cache between the two
# matrix-vector products of an iteration, so each iteration reads P from memory once
_BLOCK_ELEMENTS = 1 << 18


def _sinkhorn_scaling(scores: torch.Tensor, epsilon: float, hi: float, dtype: torch.dtype, num_b: float,
                      iterations: int, group, world: int) -> torch.Tensor:
    """The same iterations on Q = diag(u) P diag(v), P = exp(scores / eps - hi / eps) (B_local, K):
    only u (samples) and v (prototypes) change, by matrix-vector products, and P is overwritten by
    the result. Called only where no entry of P underflows (see ``_LINEAR_RANGE``).

    P is processed in blocks of rows: the column step of one iteration (u_b from P v) and the
    row step of the next (sum_b u_b P_bk) touch the same rows, so they run on a block while it
    is in cache; P is read from memory once per iteration instead of twice."""
    num_b_rows, num_k = scores.shape
    p = torch.empty(num_b_rows, num_k, dtype=dtype, device=scores.device)
    step = max(1, _BLOCK_ELEMENTS // max(num_k, 1))
    blocks = [slice(i, min(i + step, num_b_rows)) for i in range(0, num_b_rows, step)]
    # P, and its column sums (u = 1: the official Q /= sum(Q) is again skipped, a constant)
    col = torch.zeros(num_k, dtype=dtype, device=scores.device)
    for blk in blocks:
        pb = torch.sub(scores[blk].to(dtype), hi, out=p[blk]).mul_(1.0 / epsilon).exp_()
        col.add_(pb.sum(0))
    for it in range(iterations):
        # rows (prototypes): v_k = 1 / (K * sum_b u_b P_bk), the sums over all ranks
        if world > 1:
            dist.all_reduce(col, op=dist.ReduceOp.SUM, group=group)
        v = col.mul_(num_k).reciprocal_()
        if it < iterations - 1:
            # columns (samples, local): u_b = 1 / (B * sum_k P_bk v_k); then the next row sums
            col = torch.zeros_like(v)
            for blk in blocks:
                pb = p[blk]
                u = torch.mv(pb, v).mul_(num_b).reciprocal_()
                col.addmv_(pb.t(), u)
        else:
            # the last column normalisation and Q *= B: each row of P diag(v) scaled to sum 1
            for blk in blocks:
                pb = p[blk].mul_(v)
                pb.div_(pb.sum(1, keepdim=True))
    return p


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

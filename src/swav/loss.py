"""The swapped prediction loss of SwAV (paper Eq. 1-2) over any multi-crop layout.

Notation (paper Sec. 3.1): for V crops of B images, z_{v,b} (D) is the normalised embedding of
crop v of image b, C (K x D) the prototypes, scores s_{v,b} = z_{v,b}^T C^T (K), and
p_{v,b} = softmax(s_{v,b} / tau) the prediction. For each assignment crop c (``crops_for_assign``)
the codes q_c = Sinkhorn(s_c) (B x K) are computed without gradient, and

    loss_c = 1 / (V - 1) * sum_{v != c}  -1/B sum_b sum_k q_{c,b,k} log p_{v,b,k}
    loss   = mean over assignment crops of loss_c,

averaged over prototype heads when there are several. Imports only torch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from swav.queue import FeatureQueue
from swav.sinkhorn import sinkhorn

__all__ = ["swapped_prediction_loss", "prediction_loss", "swav_loss", "compute_codes"]


def swapped_prediction_loss(
    scores: torch.Tensor,
    codes: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int],
    temperature: float = 0.1,
) -> torch.Tensor:
    """Swapped prediction loss for one prototype head.

    Args:
        scores: (V * B, K) scores of all crops, crop-major (crop v is rows [v*B, (v+1)*B)).
        codes: one (B, K) code matrix per assignment crop, in the order of ``crops_for_assign``.
        crops_for_assign: crop ids whose codes are predicted from the other crops.
        temperature: tau of the softmax (0.1 in the paper).

    Returns:
        scalar loss (float32).
    """
    if len(codes) != len(crops_for_assign):
        raise ValueError(f"got {len(codes)} code matrices for crops_for_assign {list(crops_for_assign)}")
    batch = codes[0].shape[0]
    if scores.shape[0] % batch:
        raise ValueError(f"scores have {scores.shape[0]} rows, not a multiple of the batch {batch}")
    n_crops = scores.shape[0] // batch
    if n_crops < 2:
        raise ValueError("the swapped prediction needs at least 2 crops")
    # log p_{v,b,k}: (V, B, K), computed once for all assignment crops
    log_p = F.log_softmax(scores.float() / temperature, dim=1).view(n_crops, batch, -1)
    total = log_p.new_zeros(())
    for crop_id, q in zip(crops_for_assign, codes):
        if not 0 <= crop_id < n_crops:
            raise ValueError(f"crops_for_assign names crop {crop_id}, but there are {n_crops} crops")
        # cross-entropy of q against every crop's prediction: (V,) = -1/B sum_b sum_k q log p_v
        ce = -torch.einsum("bk,vbk->v", q.float(), log_p) / batch
        total = total + (ce.sum() - ce[crop_id]) / (n_crops - 1)
    return total / len(crops_for_assign)


@torch.no_grad()
def compute_codes(
    scores: torch.Tensor | list[torch.Tensor],
    embedding: torch.Tensor,
    prototypes: torch.Tensor | list[torch.Tensor],
    crops_for_assign: Sequence[int],
    batch_size: int,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    queue: FeatureQueue | None = None,
    group=None,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Codes of the assignment crops, with the official queue semantics.

    Args:
        scores: (V * B, K) scores, crop-major (a list, one per head, for several heads).
        embedding: (V * B, D) normalised embeddings z, crop-major.
        prototypes: (K, D) prototype matrix (a list for several heads), already unit-norm.
        batch_size: B, this rank's images per crop.
        queue: optional FeatureQueue (updated in place: shifted, then this batch written).
        group: process group whose ranks share Sinkhorn's prototype sums.

    Returns:
        (codes, full): ``codes[h][i]`` is the (B, K) code of assignment crop i for head h;
        ``full[h][i]`` the whole Sinkhorn output, queue rows first (its last B rows are codes).
    """
    several = isinstance(scores, (list, tuple))
    heads = list(scores) if several else [scores]
    protos = list(prototypes) if several else [prototypes]
    b = batch_size
    codes = [[] for _ in heads]
    full = [[] for _ in heads]
    for i, crop_id in enumerate(crops_for_assign):
        out = [s[b * crop_id: b * (crop_id + 1)].detach() for s in heads]
        if queue is not None:
            out = queue.push_and_score(i, out, embedding[b * crop_id: b * (crop_id + 1)], protos)
        for h, o in enumerate(out):
            q_all = sinkhorn(o, epsilon, iterations, group=group)
            full[h].append(q_all)
            codes[h].append(q_all[-b:])
    return codes, full


def swav_loss(
    scores: torch.Tensor | list[torch.Tensor],
    embedding: torch.Tensor,
    prototypes: torch.Tensor | list[torch.Tensor],
    batch_size: int,
    crops_for_assign: Sequence[int] = (0, 1),
    *,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    queue: FeatureQueue | None = None,
    group=None,
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The whole SwAV objective of one training step (official order).

    Args: as in ``compute_codes`` (``batch_size`` = B, this rank's images per crop); ``temperature``
    is tau of the prediction softmax.

    Returns:
        (loss, full_codes): the scalar loss averaged over heads, and per head the whole Sinkhorn
        output of each assignment crop (queue rows first).
    """
    codes, full = compute_codes(
        scores, embedding, prototypes, crops_for_assign, batch_size,
        epsilon=epsilon, iterations=iterations, queue=queue, group=group,
    )
    return prediction_loss(scores, codes, crops_for_assign, temperature), full


def prediction_loss(
    scores: torch.Tensor | list[torch.Tensor],
    codes: list[list[torch.Tensor]],
    crops_for_assign: Sequence[int],
    temperature: float = 0.1,
) -> torch.Tensor:
    """The swapped prediction loss averaged over prototype heads.

    Args: ``scores`` as in ``compute_codes`` (a list for several heads); ``codes[h][i]`` the (B, K)
    code of assignment crop i for head h (``compute_codes``'s first output).
    """
    heads = list(scores) if isinstance(scores, (list, tuple)) else [scores]
    losses = [swapped_prediction_loss(s, c, crops_for_assign, temperature) for s, c in zip(heads, codes)]
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

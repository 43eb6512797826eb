"""The SwAV feature queue (paper Sec. 4, "small batches"): embeddings of earlier batches that
enlarge the set Sinkhorn equipartitions when the batch is small.

Official semantics, per assignment crop i:
  * the queue takes part once it is full (its last row is non-zero) or once it has taken part
    before (a flag shared by every crop);
  * its scores z_queue C^T are computed with the current prototypes and put before the batch's;
  * then it shifts down by B and the batch's embeddings are written at its front (newest first).

Each rank holds ``length // world_size`` rows. The state goes into the checkpoint as one global
tensor (gathered over ranks) so that a run can resume with another number of ranks; the global
order is (position, rank), i.e. by age, newest first, and a new rank r takes every w-th entry.
Imports only torch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["FeatureQueue"]


class FeatureQueue:
    """Per-rank queue of embeddings, shape (n_assign, L_local, D).

    Args:
        n_assign: number of assignment crops (``len(crops_for_assign)``), one queue each.
        length: queue rows on this rank (the global length divided by the number of ranks).
        dim: embedding dimension D.
    """

    def __init__(self, n_assign: int, length: int, dim: int, *, device=None, dtype=torch.float32):
        if n_assign < 1 or length < 1 or dim < 1:
            raise ValueError(f"FeatureQueue needs n_assign, length, dim >= 1, got {n_assign}, {length}, {dim}")
        self.buffer = torch.zeros(n_assign, length, dim, device=device, dtype=dtype)
        self.in_use = False
        # (crop i, head h) -> reused (L + B, K) float32 score matrix: on a CPU a fresh 50 MB
        # allocation per call costs as much as Sinkhorn itself (page faults), a cat a copy more
        self._scores: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    def is_full(self, i: int) -> bool:
        """Whether queue i has been filled once (its oldest row is non-zero). Host sync."""
        return bool(torch.any(self.buffer[i, -1] != 0))

    @torch.no_grad()
    def push_and_score(
        self,
        i: int,
        batch_scores: torch.Tensor | list[torch.Tensor],
        embedding: torch.Tensor,
        prototypes: torch.Tensor | list[torch.Tensor],
    ) -> torch.Tensor | list[torch.Tensor]:
        """Scores to give Sinkhorn for assignment crop i, then enqueue this batch's embeddings.

        Args:
            i: index into crops_for_assign.
            batch_scores: (B, K) scores of this crop (a list, one per prototype head, for several).
            embedding: (B, D) normalised embeddings z of this crop.
            prototypes: (K, D) prototype matrix C (a list for several heads).

        Returns:
            (L + B, K) float32 = [z_queue C^T ; batch scores] when the queue is in use, else the
            batch scores unchanged (a list for several heads). The matrix is this queue's buffer
            for crop i (and head h): the next call for the same crop overwrites it, so consume it
            (Sinkhorn) before then, or clone it.
        """
        several = isinstance(batch_scores, (list, tuple))
        scores_list = list(batch_scores) if several else [batch_scores]
        protos = list(prototypes) if several else [prototypes]
        b = embedding.shape[0]
        if b > self.length:
            raise ValueError(f"queue of {self.length} rows per rank is shorter than the batch of {b}")
        if self.in_use or self.is_full(i):
            self.in_use = True
            queue_i = self.buffer[i].float()  # scores of old embeddings with the current prototypes
            out = []
            with torch.autocast(queue_i.device.type, enabled=False):  # float32 products, written in place
                for h, (s, c) in enumerate(zip(scores_list, protos)):
                    shape = (self.length + b, c.shape[0])
                    full = self._scores.get((i, h))
                    if full is None or full.shape != shape or full.device != queue_i.device:
                        full = self._scores[(i, h)] = torch.empty(shape, dtype=torch.float32, device=queue_i.device)
                    torch.mm(queue_i, c.detach().float().t(), out=full[:self.length])
                    full[self.length:].copy_(s)
                    out.append(full)
            scores_list = out
        # shift down by B (oldest rows fall off), newest at the front
        self.buffer[i, b:] = self.buffer[i, :-b].clone()
        self.buffer[i, :b] = embedding.detach().to(self.buffer.dtype)
        return scores_list if several else scores_list[0]

    # --- undoing a step ------------------------------------------------------------------
    def snapshot(self, rows: int) -> tuple[torch.Tensor, bool]:
        """What a push of ``rows`` embeddings overwrites: the ``rows`` oldest rows of every queue
        and the in-use flag. ``restore`` puts them back (a skipped, non-finite step is undone)."""
        return self.buffer[:, -rows:].clone(), self.in_use

    def restore(self, snap: tuple[torch.Tensor, bool]) -> None:
        """Undo the push that followed ``snapshot``: shift back up, put the oldest rows back."""
        tail, in_use = snap
        n = tail.shape[1]
        self.buffer[:, :-n] = self.buffer[:, n:].clone()
        self.buffer[:, -n:] = tail
        self.in_use = in_use

    def restore_where(self, snap: tuple[torch.Tensor, bool], flag: torch.Tensor) -> None:
        """``restore(snap)`` where the 0-dim bool ``flag`` is set, decided on the device (no host
        read, except on the one step where the queue started to take part)."""
        tail, in_use = snap
        n = tail.shape[1]
        undone = torch.cat([self.buffer[:, n:], tail], dim=1)
        self.buffer.copy_(torch.where(flag.to(self.buffer.device), undone, self.buffer))
        if self.in_use != in_use and bool(flag):
            self.in_use = in_use

    # --- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (use ``global_state_dict`` in a distributed run)."""
        return {"buffer": self.buffer.detach().cpu().clone(), "in_use": bool(self.in_use)}

    def load_state_dict(self, state: dict) -> None:
        buf = state["buffer"]
        if tuple(buf.shape) != tuple(self.buffer.shape):
            raise ValueError(
                f"queue state has shape {tuple(buf.shape)}, this run's queue is {tuple(self.buffer.shape)}"
            )
        self.buffer.copy_(buf.to(self.buffer.device, self.buffer.dtype))
        self.in_use = bool(state["in_use"])

    def global_state_dict(self, group=None) -> dict:
        """The whole queue over ranks as (n_assign, L_total, D), ordered by (position, rank)."""
        local = self.buffer.detach()
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return self.state_dict()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        stacked = torch.stack(parts, dim=2)  # (n_assign, L_local, world, D): position-major
        flag = torch.tensor([1.0 if self.in_use else 0.0], device=local.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        n, length, _, d = stacked.shape
        return {"buffer": stacked.reshape(n, length * world, d).cpu(), "in_use": bool(flag.item())}

    def load_global_state_dict(self, state: dict, rank: int, world_size: int) -> None:
        """Take this rank's share of a global queue (any earlier number of ranks)."""
        buf = state["buffer"]
        n, total, d = buf.shape
        if total != self.length * world_size or n != self.buffer.shape[0] or d != self.buffer.shape[2]:
            raise ValueError(
                f"saved queue holds {n} x {total} x {d}; this run needs {self.buffer.shape[0]} x "
                f"{self.length * world_size} x {self.buffer.shape[2]} ({world_size} ranks x {self.length} rows)"
            )
        self.buffer.copy_(buf[:, rank::world_size].to(self.buffer.device, self.buffer.dtype))
        self.in_use = bool(state["in_use"])

"""The one SwAV training step, used by ``swav pretrain`` (the trainer) and ``swav bench`` alike.

One step, in the official order: augment the batch into multi-crop views; set the learning rate and
L2-normalise the prototypes; forward all crops (grouped by resolution) under the run's autocast;
codes q by Sinkhorn-Knopp over the batch (and the queue); the swapped prediction loss; backward;
drop the prototypes' gradients while they are frozen; then the update, unless the loss, a gradient
or a BatchNorm statistic is non-finite, in which case the step is undone (BatchNorm statistics and
the queue put back) and skipped. In a process group every rank takes the same decision.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from swav import distributed as dist_utils
from swav.config import SwAVConfig
from swav.device import autocast, synchronize
from swav.loss import compute_codes, prediction_loss
from swav.monitor import NaNGuard
from swav.optim import set_lr
from swav.queue import FeatureQueue

__all__ = ["Learner", "StepOutcome", "train_step", "swav_objective", "PhaseClock", "PhaseTimer", "PHASES"]

PHASES = ("data", "augment", "forward", "sinkhorn", "loss", "backward", "optimizer")


class PhaseClock:
    """Marks the end of a phase of a step; this one does nothing (training)."""

    def start(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass


class PhaseTimer(PhaseClock):
    """Adds the time since the previous mark to a phase, synchronising the device first (``swav bench``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t = time.perf_counter()
        self.acc = dict.fromkeys(PHASES, 0.0)

    def start(self) -> None:
        synchronize(self.device)
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.acc[phase] += now - self.t
        self.t = now


@dataclass
class Learner:
    """What a step reads and changes: the network (``model`` is what is called, DDP or compiled;
    ``raw_model`` holds the parameters), optimizer, loss scaler, augmentation and queue."""

    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object | None
    multicrop: nn.Module
    device: torch.device
    precision: str
    world: int
    swav: SwAVConfig
    nan_guard: NaNGuard
    queue: FeatureQueue | None = None
    buffers: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        # BatchNorm running statistics change in the forward pass, before the loss is known: they
        # are copied before each step and put back when it is skipped (a few KB, no host sync)
        self.buffers = list(self.raw_model.buffers())
        self._float_buffers = [t for t in self.buffers if t.is_floating_point()]
        self._buffer_copy = [t.detach().clone() for t in self.buffers]

    def prototype_weights(self):
        p = self.raw_model.prototypes
        return p.weights() if p.multi else p.weight

    def buffers_finite(self) -> torch.Tensor:
        if not self._float_buffers:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(self._float_buffers, math.inf))).all()


@dataclass
class StepOutcome:
    loss: torch.Tensor           # the step's loss (detached), on the device
    codes: list                  # the whole Sinkhorn output per head and assignment crop
    batch_size: int              # images of this rank in the step
    applied: bool                # the update was made (False: a non-finite step, undone)
    causes: list[str]            # what was non-finite, when not applied
    signalled: bool              # a stop signal reached this rank or, in a group, any rank
    skipped_files: int           # unusable files of this step (summed over ranks in a group)


def swav_objective(scores, z, prototypes, batch: int, swav: SwAVConfig, queue, clock: PhaseClock):
    """Codes (Sinkhorn over the batch and the queue) and the swapped prediction loss: ``(loss, codes)``."""
    codes, full = compute_codes(scores, z, prototypes, swav.crops_for_assign, batch, epsilon=swav.epsilon,
                                iterations=swav.sinkhorn_iterations, queue=queue)
    clock.mark("sinkhorn")
    loss = prediction_loss(scores, codes, swav.crops_for_assign, swav.temperature)
    clock.mark("loss")
    return loss, full


def train_step(learner: Learner, images: torch.Tensor, sizes: torch.Tensor | None, params: dict, lr: float, *,
               freeze_prototypes: bool = False, signalled: bool = False, skipped_files: int = 0,
               clock: PhaseClock = PhaseClock()) -> StepOutcome:
    """One training step on this rank's ``images`` (uint8, on the device) with augmentation
    ``params`` (this rank's slice, on the device). ``signalled`` / ``skipped_files``: this rank's
    stop signal and unusable files, shared with the other ranks in the step's one small reduce."""
    L = learner
    crops = L.multicrop(images, sizes, params)
    clock.mark("augment")
    set_lr(L.optimizer, lr)
    L.raw_model.prototypes.normalize_()
    torch._foreach_copy_(L._buffer_copy, L.buffers)
    batch = images.shape[0]
    queue_snapshot = L.queue.snapshot(batch) if L.queue is not None else None
    clock.mark("optimizer")
    with autocast(L.device, L.precision):
        z, scores = L.model(crops)
    clock.mark("forward")
    loss, full = swav_objective(scores, z.detach().float(), L.prototype_weights(), batch, L.swav, L.queue, clock)
    L.optimizer.zero_grad(set_to_none=True)
    if L.scaler is not None:
        L.scaler.scale(loss).backward()
        L.scaler.unscale_(L.optimizer)
    else:
        loss.backward()
    if freeze_prototypes:
        L.raw_model.prototypes.drop_grad_()
    clock.mark("backward")
    outcome = _update_or_undo(L, loss, full, batch, signalled, skipped_files, queue_snapshot)
    clock.mark("optimizer")
    return outcome


def _update_or_undo(L: Learner, loss, full, batch, signalled, skipped_files, queue_snapshot) -> StepOutcome:
    """The update when everything is finite, else the step undone; in a process group the flags
    (non-finite, signal, skipped files) are summed over ranks so every rank decides alike."""
    buffers_ok = L.buffers_finite()
    guard_loss = loss.detach().float()
    if L.world > 1:
        flags = dist_utils.all_reduce_sum(torch.stack([
            (~(torch.isfinite(guard_loss) & buffers_ok)).float(),
            torch.full((), float(signalled), device=L.device),
            torch.full((), float(skipped_files), device=L.device)]))
        guard_loss = guard_loss + torch.where(flags[0] > 0, float("nan"), 0.0)
    else:
        guard_loss = guard_loss + torch.where(buffers_ok, 0.0, float("nan"))
    # fp16 loss scaling: non-finite gradients under a finite loss are an overflow of the scale,
    # which GradScaler handles (scaler.step skips the update, update() halves the scale), as apex
    # does: not a bad step. Only once the scale is below 1 do they mean the gradients overflow.
    grads_to_check = () if L.scaler is not None and L.scaler.get_scale() >= 1.0 else L.raw_model
    causes: list[str] = []
    applied = L.nan_guard.check(guard_loss, grads_to_check)
    if applied:
        if L.scaler is not None:
            L.scaler.step(L.optimizer)
        else:
            L.optimizer.step()
    else:
        causes = [name for name, ok in (("loss", torch.isfinite(loss.detach()).all()),
                                        ("BatchNorm statistics", buffers_ok)) if not bool(ok)]
        L.optimizer.zero_grad(set_to_none=True)
        torch._foreach_copy_(L.buffers, L._buffer_copy)
        if queue_snapshot is not None:
            L.queue.restore(queue_snapshot)
    if L.world > 1:
        _, n_signal, n_skipped = flags.tolist()  # computed before the guard's sync: no wait
        signalled, skipped_files = n_signal > 0, int(n_skipped)
    if L.scaler is not None:
        L.scaler.update()
    return StepOutcome(loss.detach(), full, batch, applied, causes, bool(signalled), int(skipped_files))

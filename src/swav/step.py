"""The one SwAV training step, used by ``swav pretrain`` (the trainer) and ``swav bench`` alike.

One step, in the official order: augment the batch into multi-crop views; set the learning rate and
L2-normalise the prototypes; forward all crops (grouped by resolution) under the run's autocast;
codes q by Sinkhorn-Knopp over the batch (and the queue); the swapped prediction loss; backward;
drop the prototypes' gradients while they are frozen; then the update, unless the loss, a gradient
or a BatchNorm statistic is non-finite, in which case the step is undone (BatchNorm statistics and
the queue put back) and skipped. In a process group every rank takes the same decision.

The step never waits for the host: the verdict is a device tensor that masks the update and the
undo (see ``_update_or_undo``); the NaN guard counts bad steps on the device and the trainer reads
the counts when it writes a log line or a checkpoint.
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
from swav.monitor import NaNGuard, nonfinite_causes
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


class _Snapshot:
    """Copies of a fixed list of tensors, put back where a device flag says so: one flat buffer per
    dtype, so saving and the conditional restore are a few kernels whatever the number of tensors,
    and deciding needs no host read."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.groups = []
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            saved, now = (torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=ts[0].device)
                          for _ in range(2))
            self.groups.append((ts, saved, self._views(saved, ts), now, self._views(now, ts)))

    @staticmethod
    def _views(flat: torch.Tensor, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        out, at = [], 0
        for t in ts:
            out.append(flat[at:at + t.numel()].view(t.shape))
            at += t.numel()
        return out

    def save(self) -> None:
        for ts, _, saved_views, _, _ in self.groups:
            torch._foreach_copy_(saved_views, ts)

    def restore_where(self, flag: torch.Tensor) -> None:
        """Each tensor back to its saved value where ``flag`` (0-dim bool, on the device) is set."""
        for ts, saved, _, now, now_views in self.groups:
            torch._foreach_copy_(now_views, ts)
            torch.where(flag, saved, now, out=now)
            torch._foreach_copy_(ts, now_views)


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
    compile: bool = False  # torch.compile the model (resolved from train.compile); see wrap_for_training
    buffers: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        # BatchNorm running statistics change in the forward pass, before the loss is known: they
        # are copied before each step and put back on the device when it is skipped (a few KB)
        self.buffers = list(self.raw_model.buffers())
        self._float_buffers = [t for t in self.buffers if t.is_floating_point()]
        self._buffer_copy = _Snapshot(self.buffers)

    def prototype_weights(self):
        p = self.raw_model.prototypes
        return p.weights() if p.multi else p.weight

    def buffers_finite(self) -> torch.Tensor:
        if not self._float_buffers:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(self._float_buffers, math.inf))).all()

    def grads_finite(self) -> torch.Tensor:
        """Whether every gradient is finite (max |g| per tensor: a finite gradient never overflows)."""
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None and p.grad.numel()]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf))).all()


@dataclass
class StepOutcome:
    loss: torch.Tensor           # the step's loss (detached), on the device
    codes: list                  # the whole Sinkhorn output per head and assignment crop
    batch_size: int              # images of this rank in the step
    applied: torch.Tensor        # 0-dim bool on the device: the update was made (False: a non-finite step, undone)
    flags: torch.Tensor          # (3,) bool on the device: this rank's non-finite loss, BatchNorm statistics, gradients
    signalled: bool              # one process: a stop signal reached it (in a group: False, see group_flags)
    skipped_files: int           # unusable files of this rank in this step
    group_flags: torch.Tensor | None = None  # in a group, on the device: (stop signals, unusable files) over ranks

    @property
    def causes(self) -> list[str]:
        """What was non-finite on this rank (a host read: for tests and reports, not the hot path)."""
        return nonfinite_causes(self.flags.tolist())


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
               clock: PhaseClock = PhaseClock(), step: int = 0) -> StepOutcome:
    """One training step on this rank's ``images`` (uint8, on the device) with augmentation
    ``params`` (this rank's slice: host tensors, so the crops are planned on the host, or on the
    device) and the images' true ``sizes`` (host, or None). ``signalled`` / ``skipped_files``:
    this rank's stop signal and unusable files, shared with the other ranks in the step's one
    small reduce; ``step`` numbers the step for the NaN guard. Nothing here reads a value of the
    device on the host."""
    L = learner
    crops = L.multicrop(images, sizes, params)
    clock.mark("augment")
    set_lr(L.optimizer, lr)
    L.raw_model.prototypes.normalize_()
    L._buffer_copy.save()
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
    outcome = _update_or_undo(L, loss, full, batch, signalled, skipped_files, queue_snapshot, step)
    clock.mark("optimizer")
    return outcome


def _update_or_undo(L: Learner, loss, full, batch, signalled, skipped_files, queue_snapshot, step) -> StepOutcome:
    """The update where everything is finite, else the step undone, decided on the device: the
    verdict masks the optimizer's step (parameters, momentum, scaler as before) and puts the
    BatchNorm statistics and the queue back where it is set. In a process group the flags
    (non-finite, signal, skipped files) are summed over ranks so every rank decides alike."""
    # fp16 loss scaling: non-finite gradients under a finite loss are an overflow of the scale,
    # which GradScaler handles (the update is skipped, update() halves the scale), as apex does:
    # not a bad step. Only once the scale is below 1 do they mean the gradients overflow.
    flags = torch.stack([~torch.isfinite(loss.detach().float()), ~L.buffers_finite(), ~L.grads_finite()])
    if L.scaler is not None:
        flags[2] &= L.scaler._scale.to(flags.device) < 1.0
    bad, group_flags = flags.any(), None
    if L.world > 1:
        agreed = dist_utils.all_reduce_sum(torch.stack([
            bad.float(), torch.full((), float(signalled), device=L.device),
            torch.full((), float(skipped_files), device=L.device)]))
        bad, group_flags = agreed[0] > 0, agreed[1:]
    overflow = _scaler_overflow(L)
    skip = bad if overflow is None else bad | overflow
    _masked_optimizer_step(L, skip, bad)
    L._buffer_copy.restore_where(bad)
    if queue_snapshot is not None:
        L.queue.restore_where(queue_snapshot, bad)
    if L.scaler is not None:
        scale, tracker = L.scaler._scale.clone(), L.scaler._growth_tracker.clone()
        L.scaler.update()  # a bad step leaves the scale and its growth count as they were
        L.scaler._scale.copy_(torch.where(bad, scale, L.scaler._scale))
        L.scaler._growth_tracker.copy_(torch.where(bad, tracker, L.scaler._growth_tracker))
    L.nan_guard.observe(bad, flags, step)
    # in a group a rank's own signal must not stop it alone: every rank stops where the summed
    # signals are read (group_flags, at the trainer's read points)
    alone = bool(signalled) and L.world == 1
    return StepOutcome(loss.detach(), full, batch, ~bad, flags, alone, int(skipped_files), group_flags)


def _scaler_overflow(L: Learner) -> torch.Tensor | None:
    """The GradScaler's verdict of this step (non-finite scaled gradients), on the device."""
    if L.scaler is None:
        return None
    found = L.scaler._found_inf_per_device(L.optimizer)  # recorded by unscale_
    return sum(v.to(L.device) for v in found.values()) > 0


def _masked_optimizer_step(L: Learner, skip: torch.Tensor, bad: torch.Tensor) -> None:
    """The optimizer's step where ``skip`` is not set. An optimizer that takes a device-side skip
    flag (ours LARS; torch's fused ones: ``_step_supports_amp_scaling``) gets it and never makes
    the host wait; any other reads ``bad`` on the host once (its own GradScaler path reads the
    overflow anyway)."""
    opt = L.optimizer
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, skip.float()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
    elif not bool(bad):
        if L.scaler is not None:
            L.scaler.step(opt)
        else:
            opt.step()

"""Optimisers and learning-rate schedules for SwAV pretraining.

The official SwAV code trains with SGD wrapped in apex's ``LARC`` (``clip=False``),
a per-step cosine learning-rate schedule and a linear warmup.  This module gives a
pure-PyTorch equivalent of that rule (:class:`LARS`), the schedule
(:func:`cosine_schedule`) and a small factory (:func:`build_optimizer`).

LARS rule, for one parameter tensor ``w`` with gradient ``g`` (apex LARC, clip=False)::

    local_lr = eta * ||w|| / (||g|| + wd * ||w|| + 1e-8)     if ||w|| > 0 and ||g|| > 0
    g'       = (g + wd * w) * local_lr                        (otherwise g' = g)
    buf      = momentum * buf + g'                            (buf = g' on the first step)
    w       <- w - lr * buf

``wd`` is the weight decay and ``eta`` the trust coefficient (0.001 in SwAV).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from torch import nn

__all__ = [
    "LARS",
    "lars_local_lr",
    "build_optimizer",
    "cosine_schedule",
    "set_lr",
    "OPTIMIZERS",
]

OPTIMIZERS = ("lars", "sgd", "adamw")

_LARS_EPS = 1e-8  # apex LARC's default eps, added to the denominator of the trust ratio


def lars_local_lr(param_norm: torch.Tensor, grad_norm: torch.Tensor, weight_decay: float,
                  eta: float, eps: float = _LARS_EPS) -> torch.Tensor:
    """Layer-wise trust ratio of LARS, elementwise over tensors of norms.

    ``local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)``, and 1 wherever ``||w|| == 0``
    or ``||g|| == 0`` (apex LARC leaves such gradients untouched: a plain SGD step).
    """
    ratio = eta * param_norm / (grad_norm + weight_decay * param_norm + eps)
    ok = (param_norm > 0) & (grad_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as used by SwAV.

    Matches apex ``LARC(SGD(...), trust_coefficient=eta, clip=False)``: weight decay is
    folded into the gradient *before* the trust ratio is applied, and SGD itself then runs
    without weight decay, dampening or Nesterov.

    Args:
        params: parameters or parameter groups.
        lr: global learning rate (the schedule value; LARS multiplies it per layer).
        momentum: SGD momentum (0.9 in SwAV).
        weight_decay: ``wd`` (1e-6 in SwAV).
        eta: trust coefficient (0.001 in SwAV).
        exclude_bias_and_bn: when True, 1-D parameters (biases, BatchNorm affine weights)
            get neither the LARS adaptation nor weight decay: ``g' = g``.  Common in BYOL-style
            recipes; off by default to match the official SwAV code.

    Parameters whose ``.grad`` is ``None`` are skipped entirely (no weight decay, no
    momentum update, no state): the trainer freezes the prototypes this way.
    The step performs no host-device synchronisation.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, exclude_bias_and_bn: bool = False):
        if lr < 0.0:
            raise ValueError(f"LARS: invalid learning rate {lr} (must be >= 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: invalid momentum {momentum} (must be in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"LARS: invalid weight_decay {weight_decay} (must be >= 0)")
        if eta <= 0.0:
            raise ValueError(f"LARS: invalid trust coefficient eta {eta} (must be > 0)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        exclude_bias_and_bn=exclude_bias_and_bn)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._group_step(group)
        return loss

    def _group_step(self, group: dict) -> None:
        wd, eta = group["weight_decay"], group["eta"]
        lr, momentum = group["lr"], group["momentum"]
        exclude = group["exclude_bias_and_bn"]
        plain_group = group.get("lars_exclude", False)  # every parameter: g' = g (issue 21/22 contract)

        adapted: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # (device, dtype) -> params
        params: list[torch.Tensor] = []
        updates: list[torch.Tensor] = []  # g' per parameter, in the order of `params`
        plain: list[int] = []  # positions in `updates` that still hold the raw grad
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            params.append(p)
            updates.append(p.grad)
            if plain_group or (exclude and p.ndim <= 1):
                plain.append(len(params) - 1)
            else:
                adapted[(p.device, p.dtype)].append(len(params) - 1)
        if not params:
            return

        # g' = (g + wd * w) * local_lr for the adapted parameters, one stacked norm per
        # (device, dtype) bucket so that the trust ratios are computed in a few kernels.
        for idx in adapted.values():
            ps = [params[i] for i in idx]
            gs = [updates[i] for i in idx]
            dtype = torch.promote_types(ps[0].dtype, torch.float32)  # fp16/bf16 -> fp32
            p_norm = torch.stack(torch._foreach_norm(ps)).to(dtype)
            g_norm = torch.stack(torch._foreach_norm(gs)).to(dtype)
            ok = (p_norm > 0) & (g_norm > 0)
            trust = lars_local_lr(p_norm, g_norm, wd, eta).to(ps[0].dtype)
            # apex adds weight decay only when it also applies the trust ratio
            decay = torch.where(ok, torch.full_like(p_norm, wd), torch.zeros_like(p_norm))
            new = torch._foreach_mul(ps, list(decay.to(ps[0].dtype).unbind()))
            torch._foreach_add_(new, gs)
            torch._foreach_mul_(new, list(trust.unbind()))
            for i, t in zip(idx, new):
                updates[i] = t

        if momentum != 0.0:
            bufs, fresh = [], []
            for i, p in enumerate(params):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(updates[i]).detach()
                    state["momentum_buffer"] = buf
                    fresh.append(i)
                bufs.append(buf)
            fresh_set = set(fresh)
            old = [i for i in range(len(params)) if i not in fresh_set]
            if old:
                old_bufs = [bufs[i] for i in old]
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, [updates[i] for i in old])
            steps = bufs
        else:
            steps = updates
        torch._foreach_add_(params, steps, alpha=-lr)


def _split_decay(model: nn.Module, no_weight_decay=()) -> tuple[list, list]:
    """Split a model's trainable parameters into (decay, no_decay) by kind: every parameter of a norm
    layer and every bias, whatever their names or shapes, plus the names in ``no_weight_decay`` (a
    library's own list, e.g. timm's position embeddings) go to no_decay (:func:`swav.models.decay_groups`)."""
    from swav.models import decay_groups

    return decay_groups(model, set(no_weight_decay))


def build_optimizer(model_or_params, name: str, lr: float, weight_decay: float = 1e-6,
                    momentum: float = 0.9, lars_eta: float = 0.001,
                    exclude_bias_and_bn: bool = False, no_weight_decay=()) -> torch.optim.Optimizer:
    """Build the pretraining optimiser.

    Args:
        model_or_params: an ``nn.Module`` (its trainable parameters are used) or an iterable
            of parameters.  An iterable of parameter-group dicts is passed through as is.
        name: ``"lars"`` (the SwAV recipe), ``"sgd"`` (momentum SGD) or ``"adamw"``
            (``momentum`` is ignored; betas stay at (0.9, 0.999)).
        lr: initial learning rate; the trainer overwrites it every step with :func:`set_lr`.
        weight_decay, momentum, lars_eta: as in :class:`LARS`.
        exclude_bias_and_bn: keep norm layers and biases (by module kind, for a module; 1-D
            parameters for a flat list) and the names in ``no_weight_decay`` out of weight decay
            and, for LARS, out of the trust ratio: for a module, a second parameter group with
            ``weight_decay=0`` (and ``lars_exclude=True`` for LARS).
        no_weight_decay: full parameter names of ``model_or_params`` (a module) to exclude too.
    """
    module = model_or_params if isinstance(model_or_params, nn.Module) else None
    if module is not None:
        params: list = [p for p in module.parameters() if p.requires_grad]
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError("build_optimizer: no trainable parameters were given")
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")

    groups_given = isinstance(params[0], dict)
    if exclude_bias_and_bn and not groups_given and (module is not None or key != "lars"):
        decay, no_decay = _split_decay(module, no_weight_decay) if module is not None else (
            [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1])
        extra = {"lars_exclude": True} if key == "lars" else {}
        params = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0, **extra})
                  if g["params"]]
    if key == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta,
                    exclude_bias_and_bn=exclude_bias_and_bn and module is None and not groups_given)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def cosine_schedule(base_lr: float, final_lr: float, epochs: float, steps_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup: float = 0.0) -> np.ndarray:
    """One learning rate per optimisation step (the official SwAV schedule).

    With ``W = round(warmup_epochs * steps_per_epoch)`` warmup steps and
    ``T = epochs * steps_per_epoch - W`` cosine steps::

        lr[0:W]   = linspace(start_warmup, base_lr, W)                      (both ends included)
        lr[W + t] = final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * t / T)),  t = 0..T-1

    ``warmup_epochs`` may be fractional, and so may ``epochs`` (a time budget that cuts the last
    epoch short).  Returns a float64 array of length ``round(epochs * steps_per_epoch)``.
    """
    if epochs < 0 or steps_per_epoch < 1:
        raise ValueError(f"cosine_schedule: need epochs >= 0 and steps_per_epoch >= 1, "
                         f"got epochs={epochs}, steps_per_epoch={steps_per_epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"cosine_schedule: warmup_epochs must be >= 0, got {warmup_epochs}")
    total = int(round(epochs * steps_per_epoch))
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup > total:
        raise ValueError(
            f"cosine_schedule: {warmup_epochs} warmup epochs exceed the {epochs} training epochs; "
            "shorten the warmup (scale it with the number of epochs when fitting a time budget)")
    warm = np.linspace(start_warmup, base_lr, warmup, dtype=np.float64)
    T = total - warmup
    t = np.arange(T, dtype=np.float64)
    cos = final_lr + 0.5 * (base_lr - final_lr) * (1.0 + np.cos(math.pi * t / max(T, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (call once per step with the schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)

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

    A parameter group may carry ``"lars_exclude": True``: every parameter of that group, whatever
    its shape, gets ``g' = g`` (no trust ratio, no weight decay).

    Parameters whose ``.grad`` is ``None`` are skipped entirely (no weight decay, no
    momentum update, no state): the trainer freezes the prototypes this way.

    The step is a few kernels and never waits for the host: the lists of each group (parameters,
    which are adapted, their sizes, a flat buffer for the updates) are built once per set of
    parameters with gradients; the trust ratios stay on the device and, on a GPU, reach each
    element through one flat buffer (``repeat_interleave``), so every operation is one ``_foreach``
    call or one kernel over all parameters. ``step(found_inf=flag)`` (a device tensor; also taken from the
    ``found_inf`` attribute that ``torch.amp.GradScaler.step`` sets) applies the step only where
    ``flag`` is 0: where it is not, parameters and momentum buffers stay bit for bit as they were,
    decided on the device. Only the step that creates a parameter's momentum buffer reads the flag
    on the host (whether the buffer should exist at all).
    """

    _step_supports_amp_scaling = True  # GradScaler.step passes grad_scale / found_inf instead of syncing

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
                        exclude_bias_and_bn=exclude_bias_and_bn, lars_exclude=False)
        super().__init__(params, defaults)
        self._plans: dict[tuple, list[_LarsBucket]] = {}

    def __setstate__(self, state: dict) -> None:
        """Also after ``load_state_dict``: groups saved before ``lars_exclude`` existed get False."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lars_exclude", False)

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)  # GradScaler.step on gradients not yet unscaled
        skip = None if found_inf is None else found_inf != 0
        for index, group in enumerate(self.param_groups):
            for bucket in self._plan(index, group):
                if grad_scale is not None:
                    torch._foreach_div_(bucket.grads(), grad_scale.to(bucket.device))
                self._bucket_step(bucket, group, None if skip is None else skip.to(bucket.device))
        return loss

    def _plan(self, index: int, group: dict) -> list["_LarsBucket"]:
        """The buckets (one per device and dtype) of the group's parameters that have gradients,
        built the first time this set of parameters is met."""
        live = [p for p in group["params"] if p.grad is not None]
        key = (index, group["exclude_bias_and_bn"], group["lars_exclude"],
               tuple((id(p), p.dtype, p.device, p.stride()) for p in live))
        plan = self._plans.get(key)
        if plan is None:
            for p in live:
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
            by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in live:
                by_kind[(p.device, p.dtype)].append(p)
            exclude = lambda p: group["lars_exclude"] or (group["exclude_bias_and_bn"] and p.ndim <= 1)  # noqa: E731
            plan = self._plans[key] = [_LarsBucket(ps, [not exclude(p) for p in ps]) for ps in by_kind.values()]
        return plan

    def _bucket_step(self, b: "_LarsBucket", group: dict, skip: torch.Tensor | None) -> None:
        """g' = (g + d w) t with t the trust ratio and d = wd where adapted (t = 1, d = 0 where not),
        then momentum and the update; with ``skip`` set, g' = 0, momentum 1 and no update."""
        wd, eta, lr, momentum = group["weight_decay"], group["eta"], group["lr"], group["momentum"]
        grads = b.grads()
        norm_dtype = torch.promote_types(b.dtype, torch.float32)  # fp16/bf16 -> fp32
        p_norm = torch.stack(torch._foreach_norm(b.params)).to(norm_dtype)
        g_norm = torch.stack(torch._foreach_norm(grads)).to(norm_dtype)
        ok = (p_norm > 0) & (g_norm > 0) & b.adapted  # apex: weight decay only with the trust ratio
        trust = torch.where(ok, lars_local_lr(p_norm, g_norm, wd, eta), 1.0).to(b.dtype)
        decay = ok.to(b.dtype) * wd
        torch._foreach_copy_(b.update, b.params)
        b.scale_(decay)  # d w
        torch._foreach_add_(b.update, grads)  # + g
        b.scale_(trust)  # * t
        if skip is not None:
            b.flat.masked_fill_(skip, 0.0)  # NaN-safe: a skipped step adds nothing
        if momentum != 0.0:
            steps = self._momentum(b, momentum, skip)
            if steps is None:
                return
        else:
            steps = b.update
        if skip is None:
            torch._foreach_add_(b.params, steps, alpha=-lr)
        elif b.device.type in b.SPREAD_ON:
            torch._foreach_add_(b.params, torch._foreach_mul(steps, (~skip).to(b.dtype) * -lr))
        else:  # one fused pass per parameter: w += step * (-lr or 0)
            torch._foreach_addcmul_(b.params, steps, [(~skip).to(b.dtype) * -lr] * len(steps))

    def _momentum(self, b: "_LarsBucket", momentum: float, skip: torch.Tensor | None):
        """buf = momentum buf + g' (buf = g' on a parameter's first step); None: skipped on the
        first step (read on the host: the buffers must not exist after it)."""
        fresh = [i for i, p in enumerate(b.params) if "momentum_buffer" not in self.state.get(p, {})]
        if fresh and skip is not None and bool(skip):
            return None
        for i in fresh:
            self.state[b.params[i]]["momentum_buffer"] = b.update[i].clone()
        states = [self.state[p] for p in b.params]
        old = [i for i in range(len(states)) if i not in set(fresh)]
        if old:
            bufs = [states[i]["momentum_buffer"] for i in old]
            factor = momentum if skip is None else torch.where(skip, b.scalar(1.0), b.scalar(momentum))
            torch._foreach_mul_(bufs, factor)
            torch._foreach_add_(bufs, [b.update[i] for i in old])
        return [st["momentum_buffer"] for st in states]


class _LarsBucket:
    """Parameters of one LARS group on one device and dtype, and what their step reuses: whether
    each is adapted, their element counts (for spreading per-parameter factors over a flat buffer)
    and that flat buffer, with one view shaped (and strided) like each parameter."""

    SPREAD_ON = ("cuda",)  # device types whose per-parameter factors are spread over the flat buffer

    def __init__(self, params: list[torch.Tensor], adapted: list[bool]):
        self.params = params
        self.device, self.dtype = params[0].device, params[0].dtype
        self.adapted = torch.tensor(adapted, dtype=torch.bool, device=self.device)
        numels = [p.numel() for p in params]
        self.numels = torch.tensor(numels, dtype=torch.int64, device=self.device)
        self.total = sum(numels)
        self.flat = torch.empty(self.total, dtype=self.dtype, device=self.device)
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        self.update = [self.flat.as_strided(p.shape, p.stride(), o) for p, o in zip(params, offsets)]

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]

    def scalar(self, value: float) -> torch.Tensor:
        """``value`` as a 0-dim tensor of the bucket's dtype on its device (a fill, not a copy)."""
        return torch.full((), value, dtype=self.dtype, device=self.device)

    def scale_(self, per_param: torch.Tensor) -> None:
        """Multiply each parameter's update by its factor ((P,), on the device). On a GPU the
        factors are spread over the flat buffer (one ``repeat_interleave`` of known size, no host
        read) and applied by one kernel; on a CPU, where a kernel call costs little and memory
        passes are what counts, each update is multiplied by its own 0-dim factor."""
        if self.device.type in self.SPREAD_ON:
            self.flat.mul_(torch.repeat_interleave(per_param, self.numels, output_size=self.total))
        else:
            torch._foreach_mul_(self.update, list(per_param.unbind()))


def _split_decay(model: nn.Module, no_weight_decay=()) -> tuple[list, list]:
    """Split a model's trainable parameters into (decay, no_decay) by kind: every parameter of a norm
    layer and every bias, whatever their names or shapes, plus the names in ``no_weight_decay`` (a
    library's own list, e.g. timm's position embeddings) go to no_decay (:func:`swav.models.decay_groups`)."""
    from swav.models import decay_groups

    return decay_groups(model, set(no_weight_decay))


def build_optimizer(model_or_params, name: str, lr: float, weight_decay: float = 1e-6,
                    momentum: float = 0.9, lars_eta: float = 0.001,
                    exclude_bias_and_bn: bool = False, no_weight_decay=(), fused: bool | None = None
                    ) -> torch.optim.Optimizer:
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

    ``fused``: AdamW through torch's fused kernels (default: where every parameter is on CUDA).
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
        # not fused: torch's fused SGD fails on a step where some parameters already have momentum
        # and others (the prototypes, frozen at first) do not, and keeps uninitialised momentum
        # after a skipped first step
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if fused is None:  # torch's fused AdamW on CUDA: a few kernels, and the skip flag on the device
        fused = all(p.is_cuda for p in _flat(params))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def _flat(params: list) -> list[torch.Tensor]:
    return [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params


#: Parameter-group settings that say how an optimizer runs, not where it stands: a checkpoint
#: written on another device or by an older version keeps the ones of the optimizer it is loaded into.
_HOW_IT_RUNS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping its own :data:`_HOW_IT_RUNS` settings (a fused
    AdamW that takes the device-side skip flag stays fused when the checkpoint came from a CPU).
    They are put into the saved groups before loading, so torch places the state by them (a fused
    AdamW's step counts go to its parameters' device)."""
    how = [{k: g[k] for k in _HOW_IT_RUNS if k in g} for g in optimizer.param_groups]
    groups = state["param_groups"]
    if len(groups) != len(how):
        raise ValueError(f"the checkpoint's optimizer has {len(groups)} parameter group(s), this run's "
                         f"{len(how)}: it was written by another optimizer setting")
    optimizer.load_state_dict({**state, "param_groups": [{**g, **own} for g, own in zip(groups, how)]})


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

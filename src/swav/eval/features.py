"""Frozen-feature extraction for kNN / linear evaluation."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["extract_features", "recompute_batchnorm"]


def extract_features(
    model: nn.Module,
    batches: Iterable[Any],
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
    *,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``batches`` and return ``(features, labels, indices)`` sorted by index.

    Each batch is any object with ``images`` (uint8 ``(N, C, H, W)``),
    ``sizes`` (int64 ``(N, 2)``), ``labels`` (int64 ``(N,)``) and ``indices``
    (int64 ``(N,)``).  ``transform(images, sizes)`` runs on ``device`` and
    returns the float input of the model; the model must return pooled
    features ``(N, D)``.  Features come back as float32 on the CPU, labels and
    indices as int64 on the CPU; all are ordinary tensors (usable with
    autograd, e.g. to train a linear classifier on them).

    The model runs in eval mode under ``torch.inference_mode`` (optionally in
    autocast with ``amp_dtype``); its previous train/eval mode is restored.
    """
    device = torch.device(device)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                images = batch.images.to(device, non_blocking=True)
                sizes = batch.sizes.to(device, non_blocking=True)
                x = transform(images, sizes)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                autocast = (
                    torch.autocast(device_type=device.type, dtype=amp_dtype)
                    if amp_dtype is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    out = model(x)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"model returned {type(out).__name__}; extract_features needs a model that returns one "
                        "(N, D) tensor (wrap it to pick the backbone's pooled features)"
                    )
                n = images.shape[0]
                if out.dim() != 2 or out.shape[0] != n:
                    raise ValueError(
                        f"model output has shape {tuple(out.shape)} for {n} images; expected pooled features "
                        f"({n}, D) (add global pooling / flatten)"
                    )
                if batch.labels.shape != (n,) or batch.indices.shape != (n,):
                    raise ValueError(
                        f"batch with {n} images has labels {tuple(batch.labels.shape)} and indices "
                        f"{tuple(batch.indices.shape)}; expected ({n},)"
                    )
                feats.append(out.float().cpu())
                labels.append(batch.labels.cpu().long())
                indices.append(batch.indices.cpu().long())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features got no batches: check the data loader / dataset is not empty")
    # Outside inference mode, so the results are ordinary tensors.
    all_idx = torch.cat(indices)
    order = torch.argsort(all_idx, stable=True)
    return torch.cat(feats)[order], torch.cat(labels)[order], all_idx[order]


def recompute_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
) -> int:
    """Replace the running mean and variance of every BatchNorm of ``model`` by their plain average
    over ``batches`` ("precise BN", Wu & Johnson 2021); returns the number of images seen.

    Per BatchNorm, with x_b the (N_b, C, ...) input of batch b of B batches:
        running_mean = 1/B sum_b mean(x_b),  running_var = 1/B sum_b var_unbiased(x_b)   (C,)
    Nothing else changes: the weights, the modules' momentum and train/eval modes are as before.
    Training statistics of SwAV mix large and small crops through the same BatchNorm, so they match
    neither the whole images a backbone is evaluated and used on. ``batches`` and ``transform`` are
    as in :func:`extract_features`. If anything fails the old statistics are put back.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("recompute_batchnorm: the model has no BatchNorm layers")
    if any(not m.track_running_stats for m in bns):
        raise ValueError("recompute_batchnorm: a BatchNorm layer does not track running statistics")
    device = torch.device(device)
    saved = [(m, m.momentum, m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
             for m in bns]
    was_training = model.training
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for batch in batches:
                images = batch.images.to(device, non_blocking=True)
                model(transform(images, batch.sizes.to(device, non_blocking=True)))
                n += images.shape[0]
        if n == 0:
            raise ValueError("recompute_batchnorm got no batches: check the data loader / dataset is not empty")
    except BaseException:
        for m, _, _, buffers in saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, momentum, training, _ in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return n

"""Frozen-feature extraction for kNN / linear evaluation."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["extract_features"]


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

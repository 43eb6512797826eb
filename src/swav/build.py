"""Building a run's parts from its config: the network, the multi-crop augmentation, the optimizer
and the whole training state. The trainer, ``swav bench``, the evaluations and the report all build
through here (so a checkpoint's model is rebuilt exactly as it was trained)."""
from __future__ import annotations

import torch

from swav import distributed as dist_utils
from swav.config import Config
from swav.data.multicrop import MultiCrop
from swav.models import SwAVModel, create_backbone
from swav.optim import build_optimizer

__all__ = ["build_model", "build_multicrop", "build_training_state", "wrap_for_training"]


def build_model(cfg: Config) -> SwAVModel:
    """The SwAV network of a config (deterministic given torch's RNG state)."""
    m = cfg.model
    backbone = create_backbone(m.arch, width_per_group=m.width_per_group, widen=m.widen,
                               in_chans=m.in_chans, small_stem=m.small_stem, pool_size=m.pool_size,
                               zero_init_residual=m.zero_init_residual)
    return SwAVModel(backbone, hidden_mlp=m.hidden_mlp, feat_dim=m.feat_dim, nmb_prototypes=m.nmb_prototypes)


def build_multicrop(cfg: Config) -> MultiCrop:
    """The configured multi-crop augmentation (on CPU; move it with ``.to(device)``)."""
    a = cfg.augment
    return MultiCrop(a.size_crops, a.nmb_crops, a.min_scale_crops, a.max_scale_crops, a.flip_prob,
                     a.jitter_strength, a.jitter_prob, a.grayscale_prob, a.blur_prob, tuple(a.blur_sigma),
                     tuple(a.mean), tuple(a.std), in_chans=cfg.model.in_chans,
                     channels_last=cfg.train.channels_last, erase_prob=a.erase_prob,
                     erase_scale=tuple(a.erase_scale))


def build_training_state(cfg: Config, device: torch.device, world: int, precision: str):
    """``(model, optimizer, scaler)`` of a run, seeded: the model on ``device`` (SyncBatchNorm
    over ``world`` > 1 processes, channels_last as configured), the configured optimizer, and a
    GradScaler for fp16 (else None)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if world > 1 and cfg.model.sync_bn:
        model = dist_utils.convert_sync_batchnorm(model, device.type)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay,
                                cfg.optim.momentum, cfg.optim.lars_eta, cfg.optim.exclude_bias_and_bn)
    scaler = None
    if precision == "fp16":  # loss scaling; torch < 2.3 has only the CUDA one
        scaler = torch.amp.GradScaler(device.type) if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    return model, optimizer, scaler


def wrap_for_training(model: torch.nn.Module, device: torch.device, world: int, compile: bool) -> torch.nn.Module:
    """The module the step calls: DistributedDataParallel over ``world`` > 1 processes, then
    ``torch.compile`` when asked. The unwrapped ``model`` keeps the parameters."""
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    if compile:
        model = torch.compile(model)
    return model

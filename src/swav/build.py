"""Building a run's parts from its config: the network, the multi-crop augmentation, the optimizer
and the whole training state, the training data and the learner. The trainer, ``swav bench``, the
evaluations and the report all build through here (so a checkpoint's model is rebuilt exactly as it
was trained, and ``swav bench --data`` reads a folder exactly as ``swav pretrain`` does). What
differs between backbone families is asked of the registry's adapter (``swav.models.family_of``)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from swav import distributed as dist_utils
from swav.config import Config, ConfigError
from swav.data.datasets import build_dataset, decode_sizes
from swav.data.loader import EpochLoader
from swav.data.multicrop import MultiCrop
from swav.device import configure_backends, resolve_channels_last, resolve_compile
from swav.models import SwAVModel, build_backbone, family_of
from swav.monitor import NaNGuard
from swav.optim import build_optimizer
from swav.step import Learner

__all__ = ["build_model", "build_multicrop", "build_training_state", "wrap_for_training", "check_crop_sizes",
           "decode_options", "build_train_data", "build_learner"]

log = logging.getLogger("swav")


def build_model(cfg: Config) -> SwAVModel:
    """The SwAV network of a config (deterministic given torch's RNG state). A library's constructor
    that refuses ``model.kwargs`` is a ConfigError naming them."""
    m = cfg.model
    try:
        backbone = build_backbone(dataclasses.asdict(m))
    except TypeError as e:
        if not m.kwargs:
            raise
        raise ConfigError(f"model.kwargs = {m.kwargs!r}: {m.arch} does not take them ({e})") from None
    return SwAVModel(backbone, hidden_mlp=m.hidden_mlp, feat_dim=m.feat_dim, nmb_prototypes=m.nmb_prototypes)


def build_multicrop(cfg: Config, channels_last: bool | None = None) -> MultiCrop:
    """The configured multi-crop augmentation (on CPU; move it with ``.to(device)``); its crops are
    channels-last when ``channels_last`` says so (default: ``train.channels_last`` is true)."""
    a = cfg.augment
    return MultiCrop(a.size_crops, a.nmb_crops, a.min_scale_crops, a.max_scale_crops, a.flip_prob,
                     a.jitter_strength, a.jitter_prob, a.grayscale_prob, a.blur_prob, tuple(a.blur_sigma),
                     tuple(a.mean), tuple(a.std), in_chans=cfg.model.in_chans,
                     channels_last=cfg.train.channels_last is True if channels_last is None else channels_last,
                     erase_prob=a.erase_prob, erase_scale=tuple(a.erase_scale))


def check_crop_sizes(cfg: Config, backbone: torch.nn.Module) -> None:
    """ConfigError when a crop size is too small for the network (its total stride, a fixed input
    size), naming the crop, the smallest size that works and the network's own words."""
    bad = family_of(cfg.model.arch).min_input_size(backbone, cfg.model.in_chans, cfg.augment.size_crops)
    problems = []
    for i, size in enumerate(cfg.augment.size_crops):
        if size in bad:
            good, why = bad[size]
            fix = (f"the smallest crop it takes is {good} px" if good is not None else
                   "no crop size up to 8x larger works either (a network of one fixed input size?)")
            problems.append(f"augment.size_crops[{i}] = {size} px is too small for {cfg.model.arch}: {fix} "
                            f"(the network says: {why})")
    if problems:
        raise ConfigError(problems)


def build_training_state(cfg: Config, device: torch.device, world: int, precision: str, init_weights: bool = True):
    """``(model, optimizer, scaler)`` of a run, seeded: the model on ``device`` (its backbone loaded
    from ``model.init_from`` when ``init_weights``: a new run, not a resumed one; SyncBatchNorm over
    ``world`` > 1 processes where the network has BatchNorm; channels_last as configured), checked
    against the crop sizes, the configured optimizer (norms and biases found by kind), and a
    GradScaler for fp16 (else None)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    family = family_of(cfg.model.arch)
    check_crop_sizes(cfg, model.backbone)
    if init_weights and cfg.model.init_from:
        from swav.checkpoint import load_backbone_weights

        report = load_backbone_weights(model.backbone, family, cfg.model.init_from, cfg.model.arch)
        log.info("%s", report.line())
    has_bn = any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in model.modules())
    if world > 1 and cfg.model.sync_bn and has_bn:
        model = dist_utils.convert_sync_batchnorm(model, device.type, family.sync_norm_layer)
    model = model.to(device)
    if cfg.train.channels_last is True:  # "auto" is resolved by build_learner
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    no_decay = {f"backbone.{n}" for n in family.no_weight_decay(model.backbone)}
    optimizer = build_optimizer(model, o.optimizer, o.lr, o.weight_decay, o.momentum, o.lars_eta,
                                o.exclude_bias_and_bn, no_weight_decay=no_decay)
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


def decode_options(cfg: Config) -> dict:
    """How a run decodes its image files: the keyword arguments of
    :func:`~swav.data.datasets.decode_image` (``data.max_side`` resolved against the crops: auto =
    the size no crop loses anything at, see :func:`~swav.data.datasets.crop_decode_side`)."""
    a, d = cfg.augment, cfg.data
    max_side, mean_side = decode_sizes(d.max_side, a.size_crops, a.min_scale_crops, a.nmb_crops)
    return {"in_chans": cfg.model.in_chans, "min_size": d.min_size, "max_side": max_side, "mean_side": mean_side}


def build_train_data(cfg: Config, rank: int, world: int, device: torch.device, source: str | None = None):
    """``(dataset, loader)``: the training images of ``source`` (default ``data.source``) and the
    loader of this rank (pinned batches for a CUDA device); ValueError / FileNotFoundError for a
    source that cannot be used."""
    d = cfg.data
    dataset = build_dataset(source or d.source, "train", root=d.root, download=d.download, subset=d.subset,
                            **decode_options(cfg))
    loader = EpochLoader(dataset, cfg.train.batch_size, seed=cfg.train.seed, epoch=0, rank=rank, world_size=world,
                         workers=d.workers, pin_memory=device.type == "cuda")
    return dataset, loader


def build_learner(cfg: Config, device: torch.device, world: int, precision: str, init_weights: bool = True) -> Learner:
    """The learner of a run (model, optimizer, scaler, augmentation, NaN guard), seeded, with the
    device's backend settings and ``train.channels_last`` / ``train.compile`` resolved (auto: see
    :func:`~swav.device.resolve_channels_last`, :func:`~swav.device.resolve_compile`);
    ``init_weights`` as in :func:`build_training_state`. The model is wrapped (DDP, compile) later,
    by :func:`wrap_for_training`, once a checkpoint is loaded."""
    configure_backends(device)
    channels_last = resolve_channels_last(cfg.train.channels_last, device, precision)
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=channels_last))
    model, optimizer, scaler = build_training_state(run_cfg, device, world, precision, init_weights=init_weights)
    return Learner(model, model, optimizer, scaler, build_multicrop(run_cfg, channels_last).to(device), device,
                   precision, world, cfg.swav, NaNGuard(cfg.train.nan_patience),
                   compile=resolve_compile(cfg.train.compile, device))

"""Checks a whole Config against the rules of each section and between sections, collecting every
problem into one :class:`ConfigError` with advice, and returns the warnings."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from swav.config.schema import (
    DEVICE_RE,
    BUILTIN_SOURCES,
    OPTIMIZER_NAMES,
    PRECISIONS,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SwAVConfig,
    TrainConfig,
)


def _nearest_multiples(n: int, m: int) -> str:
    lo = max(m, (n // m) * m)
    hi = lo if lo >= n else lo + m
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


class _Findings:
    """The errors and warnings found so far, with the common range and choice checks."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def err(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def at_least(self, key: str, value: float, low: float, advice: str = "") -> None:
        if value < low:
            self.err(f"{key} = {value!r} must be >= {low}" + (f"; {advice}" if advice else ""))

    def positive(self, key: str, value: float, advice: str = "") -> None:
        if not value > 0:
            self.err(f"{key} = {value!r} must be > 0" + (f"; {advice}" if advice else ""))

    def prob(self, key: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            self.err(f"{key} = {value!r} is a probability and must lie in [0, 1]")

    def choice(self, key: str, value: str, options: Iterable[str]) -> None:
        options = list(options)
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.err(f"{key} = {value!r} is not one of {', '.join(options)}{hint}")


def validate(cfg: Config, world_size: int = 1) -> list[str]:
    """Check the whole config; raise one ConfigError listing every problem with advice.

    Returns a (possibly empty) list of warnings: legal settings that are probably unintended.
    """
    found = _Findings()
    if world_size < 1:
        found.err(f"world_size = {world_size} must be >= 1")
        world_size = 1
    # Sections in schema order; a rule between two sections sits with the section whose key
    # its message names, so the problems keep their order.
    _check_data(found, cfg.data, cfg.train)
    _check_augment(found, cfg.augment, cfg.model)
    _check_model(found, cfg.model)
    _check_swav(found, cfg.swav, cfg.augment, cfg.train)
    _check_optim(found, cfg.optim, cfg.train)
    _check_train(found, cfg.train, cfg.data, world_size)
    if found.errors:
        raise ConfigError(found.errors)
    return found.warnings


def _check_data(found: _Findings, d: DataConfig, t: TrainConfig) -> None:
    """The data section, and its subset against the global batch."""
    err, at_least = found.err, found.at_least
    if not str(d.source).strip():
        err("data.source is empty; give a built-in name (" + ", ".join(BUILTIN_SOURCES)
            + "), a folder of images or a text file of image paths")
    at_least("data.subset", d.subset, 0, "0 uses every image")
    at_least("data.workers", d.workers, 0, "0 decodes in the main process")
    at_least("data.min_size", d.min_size, 0)
    if not (d.max_side == "auto" or (isinstance(d.max_side, int) and not isinstance(d.max_side, bool)
                                     and d.max_side >= 0)):
        err(f"data.max_side = {d.max_side!r} must be auto (the size the crops need), a longer side in "
            "pixels, or 0 (decode at full size)")
    if 0 < d.subset < t.batch_size:
        err(f"data.subset = {d.subset} is smaller than the global batch train.batch_size = "
            f"{t.batch_size}: no full batch can be drawn; raise the subset or lower the batch")


def _check_augment(found: _Findings, a: AugmentConfig, m: ModelConfig) -> None:
    """The augment section: the crop groups, the probabilities, blur, and the normalisation
    against the model's input channels."""
    err = found.err
    _check_crop_groups(found, a)
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "erase_prob"):
        found.prob(f"augment.{key}", getattr(a, key))
    found.at_least("augment.jitter_strength", a.jitter_strength, 0.0, "0 disables colour jitter")
    if len(a.blur_sigma) != 2:
        err(f"augment.blur_sigma = {a.blur_sigma} must be [min, max], e.g. [0.1, 2.0]")
    elif not 0.0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        err(f"augment.blur_sigma = {a.blur_sigma} must satisfy 0 < min <= max")
    if len(a.erase_scale) != 2 or not 0.0 < a.erase_scale[0] <= a.erase_scale[1] < 1.0:
        err(f"augment.erase_scale = {a.erase_scale} must be [min, max] with 0 < min <= max < 1, e.g. [0.02, 0.33]")
    for key, vals in (("augment.mean", a.mean), ("augment.std", a.std)):
        if len(vals) != m.in_chans:
            err(f"{key} has {len(vals)} value(s) but model.in_chans = {m.in_chans}; give one per "
                "input channel")
    for i, v in enumerate(a.std):
        if not v > 0:
            err(f"augment.std[{i}] = {v} must be > 0")


def _check_crop_groups(found: _Findings, a: AugmentConfig) -> None:
    """The multi-crop lists: one entry per group, sizes, counts and scale ranges."""
    err = found.err
    groups = {"augment.size_crops": a.size_crops, "augment.nmb_crops": a.nmb_crops,
              "augment.min_scale_crops": a.min_scale_crops,
              "augment.max_scale_crops": a.max_scale_crops}
    lengths = {k: len(v) for k, v in groups.items()}
    if len(set(lengths.values())) != 1:
        err("augment lists must have one entry per crop group, got lengths "
            + ", ".join(f"{k}={n}" for k, n in lengths.items()))
    if not a.size_crops:
        err("augment.size_crops is empty; give at least one crop group, e.g. [224, 96]")
    for i, v in enumerate(a.size_crops):
        if v < 1:
            err(f"augment.size_crops[{i}] = {v} must be >= 1 pixel")
    for i, v in enumerate(a.nmb_crops):
        if v < 1:
            err(f"augment.nmb_crops[{i}] = {v} must be >= 1 (drop the group instead)")
    n_crops = sum(a.nmb_crops)
    if n_crops < 2:
        err(f"augment.nmb_crops = {a.nmb_crops} gives {n_crops} crop(s); swapped prediction "
            "needs at least 2 (the paper uses 2 + 6)")
    for key, vals in (("augment.min_scale_crops", a.min_scale_crops),
                      ("augment.max_scale_crops", a.max_scale_crops)):
        for i, v in enumerate(vals):
            if not 0.0 < v <= 1.0:
                err(f"{key}[{i}] = {v} must lie in (0, 1] (a fraction of the image area)")
    for i, (lo, hi) in enumerate(zip(a.min_scale_crops, a.max_scale_crops)):
        if lo > hi:
            err(f"augment.min_scale_crops[{i}] = {lo} exceeds augment.max_scale_crops[{i}] = {hi}")


def _check_model(found: _Findings, m: ModelConfig) -> None:
    """The model section: the arch is one the registry knows (a missing optional library raises
    MissingExtraError at once: one line with the pip install), and its family reads every setting
    given (ResNet-only settings at non-default values for another family are errors)."""
    import dataclasses

    from swav.models import arch_problem, family_of

    problem = arch_problem(str(m.arch))
    if problem:
        found.err(problem)
    else:
        for p in family_of(m.arch).setting_problems(m.arch, dataclasses.asdict(m)):
            found.err(p)
    found.at_least("model.width_per_group", m.width_per_group, 1)
    found.at_least("model.widen", m.widen, 1)
    found.at_least("model.in_chans", m.in_chans, 1)
    found.at_least("model.pool_size", m.pool_size, 1, "1 = global average pooling")
    found.at_least("model.hidden_mlp", m.hidden_mlp, 0, "0 makes the head a single linear layer")
    found.at_least("model.feat_dim", m.feat_dim, 1)
    found.at_least("model.nmb_prototypes", m.nmb_prototypes, 1, "3000 in the paper for ImageNet")


def _check_swav(found: _Findings, s: SwAVConfig, a: AugmentConfig, t: TrainConfig) -> None:
    """The swav section: the loss and Sinkhorn settings, the assigned crops against the
    augment crops, and the queue against the global batch and the epochs."""
    err, at_least = found.err, found.at_least
    found.positive("swav.temperature", s.temperature, "0.1 in the paper")
    found.positive("swav.epsilon", s.epsilon, "0.05 in the paper")
    if 0 < s.epsilon < 0.01:
        found.warn(f"swav.epsilon = {s.epsilon} is very small: codes become nearly one-hot "
                   "and training may collapse; the paper uses 0.05 (0.03 at most lower)")
    at_least("swav.sinkhorn_iterations", s.sinkhorn_iterations, 1, "3 in the paper")
    if not s.crops_for_assign:
        err("swav.crops_for_assign is empty; use the large crops, e.g. [0, 1]")
    n_crops = sum(a.nmb_crops)
    for c in s.crops_for_assign:
        if not 0 <= c < n_crops:
            err(f"swav.crops_for_assign names crop {c}, but augment.nmb_crops = {a.nmb_crops} "
                f"gives crops 0..{n_crops - 1}")
    dups = sorted({c for c in s.crops_for_assign if s.crops_for_assign.count(c) > 1})
    if dups:
        err(f"swav.crops_for_assign = {s.crops_for_assign} repeats crop(s) {dups}")
    _check_queue(found, s, t)
    at_least("swav.epoch_queue_starts", s.epoch_queue_starts, 0)
    at_least("swav.freeze_prototypes_epochs", s.freeze_prototypes_epochs, 0.0,
             "0 never freezes; the paper freezes during the first epoch")


def _check_queue(found: _Findings, s: SwAVConfig, t: TrainConfig) -> None:
    """swav.queue_length: a multiple of the global batch, used before the last epoch."""
    err = found.err
    if s.queue_length < 0:
        err(f"swav.queue_length = {s.queue_length} must be >= 0 (0 = no queue)")
    elif s.queue_length > 0 and t.batch_size >= 1:
        B = t.batch_size
        if s.queue_length < B:
            err(f"swav.queue_length = {s.queue_length} is shorter than the global batch "
                f"{B}; use 0 (no queue: the batch is large enough) or a multiple of the batch "
                f"such as {B} or {2 * B}")
        elif s.queue_length % B:
            err(f"swav.queue_length = {s.queue_length} is not a multiple of the global batch {B};"
                f" nearest valid values: {_nearest_multiples(s.queue_length, B)}")
        if s.epoch_queue_starts >= t.epochs:
            found.warn(f"swav.epoch_queue_starts = {s.epoch_queue_starts} >= train.epochs "
                       f"= {t.epochs}: the queue is never used")


def _check_optim(found: _Findings, o: OptimConfig, t: TrainConfig) -> None:
    """The optim section, and the warmup against the epochs."""
    err, at_least = found.err, found.at_least
    found.choice("optim.optimizer", o.optimizer, OPTIMIZER_NAMES)
    found.positive("optim.lr", o.lr, "0.6 for batch 256 with LARS, scale linearly with the batch")
    at_least("optim.final_lr", o.final_lr, 0.0)
    if o.final_lr > o.lr > 0:
        found.warn(f"optim.final_lr = {o.final_lr} exceeds optim.lr = {o.lr}: the cosine "
                   "schedule will increase the learning rate")
    at_least("optim.warmup_epochs", o.warmup_epochs, 0.0)
    if o.warmup_epochs > t.epochs >= 1:
        err(f"optim.warmup_epochs = {o.warmup_epochs} exceeds train.epochs = {t.epochs}; "
            "shorten the warmup")
    at_least("optim.start_warmup", o.start_warmup, 0.0)
    at_least("optim.weight_decay", o.weight_decay, 0.0, "1e-6 in the paper")
    if not 0.0 <= o.momentum < 1.0:
        err(f"optim.momentum = {o.momentum} must lie in [0, 1); 0.9 in the paper")
    found.positive("optim.lars_eta", o.lars_eta, "0.001 in the paper")
    if o.optimizer == "adamw" and o.lr > 0.05:
        found.warn(f"optim.lr = {o.lr} is a LARS/SGD-sized rate; AdamW wants ~1e-3")


def _check_train(found: _Findings, t: TrainConfig, d: DataConfig, world_size: int) -> None:
    """The train section: the batch against the number of processes, and the kNN monitor
    against the data source."""
    err, at_least = found.err, found.at_least
    at_least("train.epochs", t.epochs, 1)
    if t.batch_size < 1:
        err(f"train.batch_size = {t.batch_size} must be >= 1")
    elif t.batch_size % world_size:
        err(f"train.batch_size = {t.batch_size} (global) does not divide evenly over "
            f"{world_size} processes; use {_nearest_multiples(t.batch_size, world_size)}")
    at_least("train.time_budget_minutes", t.time_budget_minutes, 0.0, "0 = no budget")
    found.choice("train.precision", t.precision, PRECISIONS)
    if not DEVICE_RE.match(str(t.device)):
        err(f"train.device = {t.device!r} is not one of auto, cpu, cuda, cuda:N")
    at_least("train.seed", t.seed, 0)
    at_least("train.checkpoint_every", t.checkpoint_every, 1)
    at_least("train.save_every_steps", t.save_every_steps, 0, "0 = only at epoch ends")
    at_least("train.log_every", t.log_every, 1)
    at_least("train.nan_patience", t.nan_patience, 1)
    for key in ("channels_last", "compile"):
        if getattr(t, key) not in (True, False, "auto"):
            err(f"train.{key} = {getattr(t, key)!r} must be auto, true or false")
    at_least("train.knn_every", t.knn_every, 0, "0 turns the kNN monitor off")
    at_least("train.knn_k", t.knn_k, 1)
    at_least("train.final_linear_epochs", t.final_linear_epochs, 0)
    at_least("train.recompute_bn_images", t.recompute_bn_images, 0, "0 keeps the training statistics")
    if t.knn_every > 0 and d.source not in BUILTIN_SOURCES:
        found.warn(f"train.knn_every = {t.knn_every} but data.source = {d.source!r} has no "
                   "labels; the kNN monitor needs a built-in labelled source")
    if t.device == "cpu" and t.precision == "fp16":
        found.warn("train.precision = fp16 on the CPU is slow; use bf16 or fp32")


def check_paths(cfg: Config) -> None:
    """The rules that need the file system, checked before a run writes anything: the data source
    is a built-in or exists, the output is not a file, the input channels are 1 or 3. ConfigError."""
    import os
    from pathlib import Path

    from swav.data.builtin import BUILTIN_NAMES, canonical_name

    problems = []
    if cfg.model.in_chans not in (1, 3):
        problems.append(f"model.in_chans = {cfg.model.in_chans} must be 1 (grey) or 3 (colour)")
    src = str(cfg.data.source)
    if src.strip() and canonical_name(src) is None and not os.path.exists(src):
        problems.append(f"data.source = {src!r} is neither a built-in data set ({', '.join(BUILTIN_NAMES)}) "
                        "nor an existing folder of images or file list")
    init = cfg.model.init_from
    if init and not os.path.exists(init):
        problems.append(f"model.init_from = {init!r} (--init-from) does not exist; give a swav run folder or "
                        "checkpoint, an official SwAV file, or a torchvision or timm state dict")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"out = {str(out)!r} exists and is not a folder")
    if problems:
        raise ConfigError(problems)

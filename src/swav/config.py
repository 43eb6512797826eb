"""Typed configuration for SwAV pretraining: dataclasses, presets, YAML and validation.

A run's configuration is built in layers (later layers win)::

    defaults (the official ImageNet recipe)  <  preset  <  YAML file  <  flags  <  --set key=value

Every field carries a help string (``config_help()``) with the paper's advice where it gives
one.  ``validate(cfg, world_size)`` collects every problem at once and raises a single
:class:`ConfigError` that says what is wrong and what to do about it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import reprlib
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "AugmentConfig",
    "ModelConfig",
    "SwAVConfig",
    "OptimConfig",
    "TrainConfig",
    "Config",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "list_presets",
    "make_config",
    "validate",
    "to_dict",
    "from_dict",
    "save_yaml",
    "load_yaml",
    "read_yaml",
    "diff_configs",
    "RESUME_FREE_FIELDS",
    "config_help",
    "flatten",
    "ARCHS",
    "BUILTIN_SOURCES",
    "PRECISIONS",
]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "resnet50w2", "resnet50w4", "resnet50w5")
OPTIMIZER_NAMES = ("lars", "sgd", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUILTIN_SOURCES = ("fashion-mnist", "cifar10", "cifar100", "stl10")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MAX_YAML_BYTES = 1 << 20  # 1 MB


class ConfigError(ValueError):
    """An invalid configuration.  ``problems`` lists every individual message."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the configuration:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(msg)


def _f(default: Any, help: str):
    """A dataclass field with a help string; mutable defaults are copied per instance."""
    meta = {"help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    source: str = _f("fashion-mnist",
                     "training images: a built-in name (fashion-mnist, cifar10, cifar100, stl10), "
                     "a folder of images (searched recursively; labels are not needed), or a text "
                     "file listing one image path per line")
    root: str | None = _f(None,
                          "where built-in datasets live; default search: $SWAV_DATA, ~/.cache/swav, "
                          "then the system location")
    download: bool = _f(True, "download a missing built-in dataset into root; turn off on machines "
                              "without network access")
    subset: int = _f(0, "use only the first N training images (0 = all); handy for smoke tests, "
                        "keep it >= the global batch")
    workers: int = _f(2, "CPU worker processes that decode and augment images (0 = in the main "
                         "process); raise it until the GPU is busy, about one per CPU core")
    min_size: int = _f(0, "skip images smaller than this many pixels on either side (0 = keep all)")
    max_side: int = _f(0, "downscale images whose longer side exceeds this in the workers, before "
                          "cropping (0 = keep); e.g. 320 speeds up decoding of large photos for "
                          "224-px crops")


@dataclass
class AugmentConfig:
    size_crops: list[int] = _f([224, 96], "output side in pixels of each crop group (paper: 224 for "
                                          "the 2 large views, 96 for the small ones)")
    nmb_crops: list[int] = _f([2, 6], "number of crops per group; multi-crop 2x224 + 6x96 is the "
                                      "paper's main gain (+4% top-1 over 2 crops)")
    min_scale_crops: list[float] = _f([0.14, 0.05], "lower bound of the RandomResizedCrop area "
                                                    "fraction per group, in (0, 1]")
    max_scale_crops: list[float] = _f([1.0, 0.14], "upper bound of the RandomResizedCrop area "
                                                   "fraction per group; small crops cover at most "
                                                   "14% of the image in the paper")
    flip_prob: float = _f(0.5, "probability of a horizontal flip")
    jitter_strength: float = _f(1.0, "colour-jitter strength s: brightness/contrast/saturation "
                                     "0.8*s, hue 0.2*s (SimCLR); 0.5 is better on small images "
                                     "like CIFAR")
    jitter_prob: float = _f(0.8, "probability of applying colour jitter")
    grayscale_prob: float = _f(0.2, "probability of converting to grayscale (no effect on "
                                    "1-channel images)")
    blur_prob: float = _f(0.5, "probability of Gaussian blur; use 0 for images below ~64 px where "
                               "blur destroys the content")
    blur_sigma: list[float] = _f([0.1, 2.0], "range [min, max] of the Gaussian blur sigma in pixels")
    mean: list[float] = _f([0.485, 0.456, 0.406], "per-channel normalisation mean (one value per "
                                                  "input channel)")
    std: list[float] = _f([0.228, 0.224, 0.225], "per-channel normalisation std (one value per "
                                                 "input channel; the official code uses 0.228)")


@dataclass
class ModelConfig:
    arch: str = _f("resnet50", "backbone: resnet18/34/50/101/152 or the wide resnet50w2/w4/w5")
    width_per_group: int = _f(64, "base width of the ResNet (64 = standard); 16-32 make tiny "
                                  "models for CPU runs")
    widen: int = _f(1, "width multiplier of the ResNet (the wN archs set it themselves)")
    in_chans: int = _f(3, "input channels: 3 for colour, 1 for grayscale data such as "
                          "Fashion-MNIST")
    small_stem: bool = _f(False, "3x3 stride-1 first conv and no max-pool, for 28-64 px images; "
                                 "keep False for ImageNet-size images")
    hidden_mlp: int = _f(2048, "hidden width of the 2-layer projection head (0 = a single linear "
                               "layer)")
    feat_dim: int = _f(128, "dimension of the L2-normalised features and prototypes (128 in the "
                            "paper)")
    nmb_prototypes: int = _f(3000, "number K of prototypes; the paper finds results insensitive "
                                   "to K (3000 for ImageNet); use ~10x the number of classes for "
                                   "small data")
    sync_bn: bool = _f(True, "synchronise BatchNorm statistics over processes; matters when the "
                             "per-process batch is small (< 64)")


@dataclass
class SwAVConfig:
    temperature: float = _f(0.1, "softmax temperature tau of the swapped prediction p = "
                                 "softmax(z.c / tau); 0.1 in the paper")
    epsilon: float = _f(0.05, "entropic regularisation of the Sinkhorn codes Q; 0.05 in the paper; "
                              "lower (0.03) if the loss sits at ln K; our log-domain Sinkhorn is "
                              "stable for any value")
    sinkhorn_iterations: int = _f(3, "Sinkhorn-Knopp iterations; 3 is enough in the paper, more "
                                     "does not help")
    crops_for_assign: list[int] = _f([0, 1], "indices of the crops whose codes are computed (the "
                                             "large views, as in the paper); each code predicts "
                                             "from all other crops")
    queue_length: int = _f(0, "total feature-queue length over all processes (0 = no queue); must "
                              "be a multiple of the global batch; helps when the global batch is "
                              "small (< 1024), e.g. 3840 for batch 256")
    epoch_queue_starts: int = _f(15, "epoch at which the queue starts to be used; start it after "
                                     "the first epochs, as the paper does (15), when features have "
                                     "stopped changing fast")
    freeze_prototypes_epochs: float = _f(1.0, "keep the prototypes fixed for this many epochs "
                                              "(fractions allowed); the paper freezes them during "
                                              "the first epoch to help the optimisation start")


@dataclass
class OptimConfig:
    optimizer: str = _f("lars", "lars (the paper's recipe: SGD + LARC), sgd or adamw")
    lr: float = _f(4.8, "peak learning rate after warmup; the paper uses 4.8 for batch 4096 and "
                        "0.6 for 256 with LARS (roughly linear in the batch)")
    final_lr: float = _f(0.0048, "learning rate at the end of the cosine decay (lr / 1000 in the "
                                 "paper)")
    warmup_epochs: float = _f(10.0, "epochs of linear warmup (fractions allowed); needed for large "
                                    "batches (10 at 4096), 0 is fine at 256")
    start_warmup: float = _f(0.3, "learning rate at the first step of the warmup")
    weight_decay: float = _f(1e-6, "weight decay; 1e-6 in the paper (LARS), ~0.05 for AdamW")
    momentum: float = _f(0.9, "SGD/LARS momentum (ignored by adamw)")
    lars_eta: float = _f(0.001, "LARS trust coefficient eta: each layer steps by about "
                                "lr * eta * ||w||; 0.001 in the paper")
    exclude_bias_and_bn: bool = _f(False, "exclude biases and BatchNorm weights from weight decay "
                                          "and LARS adaptation (BYOL-style; off in the official "
                                          "SwAV code)")


@dataclass
class TrainConfig:
    epochs: int = _f(800, "training epochs (upper bound when time_budget_minutes is set); the "
                          "paper's gains keep coming up to 800")
    batch_size: int = _f(4096, "GLOBAL batch size, split evenly over processes; below 1024 turn "
                               "on the queue (swav.queue_length)")
    time_budget_minutes: float = _f(0.0, "> 0: fit the number of steps to this wall-clock budget "
                                         "after timing the first steps (at least one epoch, at "
                                         "most `epochs`; the last epoch may be cut short); the LR "
                                         "schedule is stretched to the fitted length")
    precision: str = _f("auto", "auto (bf16 where the hardware computes it natively: recent GPUs, CPUs "
                                "with avx512_bf16/AMX; else fp32), fp32, bf16 or fp16 (mixed precision "
                                "with loss scaling); bf16 is "
                                "the safe fast choice on recent GPUs, fp32 on CPU")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    seed: int = _f(31, "random seed (the official code uses 31)")
    checkpoint_every: int = _f(1, "epochs between kept checkpoint-epochN.pt copies (checkpoint.pt "
                                  "is overwritten every epoch anyway)")
    save_every_steps: int = _f(0, "also write checkpoint.pt every N steps (0 = only at epoch "
                                  "ends); useful for long epochs on pre-emptible machines")
    log_every: int = _f(10, "steps between log lines")
    nan_patience: int = _f(5, "stop after this many consecutive steps with a non-finite loss or "
                              "gradient (each is skipped, never applied); usually the lr is too high")
    channels_last: bool = _f(False, "use the channels-last memory format (faster convolutions "
                                    "with bf16/fp16 on tensor-core GPUs)")
    compile: bool = _f(False, "torch.compile the model (slower start, faster steps on GPU)")
    knn_every: int = _f(0, "run the online kNN monitor every N epochs on a labelled built-in "
                           "source (0 = off)")
    knn_k: int = _f(20, "neighbours k of the kNN monitor (20 is customary)")
    knn_max_train: int = _f(0, "use at most this many training images as the kNN memory (0 = all); "
                               "10000 keeps the monitor to seconds on a CPU")
    final_knn: bool = _f(False, "at the end, print the kNN accuracy of the learned backbone next to the "
                                "same backbone at initialisation (labelled built-in sources)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = _f("", "name of the preset the run started from (a label; see list_presets())")
    out: str = _f("runs/swav", "output folder for checkpoints, the saved config and logs")


SECTIONS: dict[str, type] = {
    "data": DataConfig, "augment": AugmentConfig, "model": ModelConfig,
    "swav": SwAVConfig, "optim": OptimConfig, "train": TrainConfig,
}
_TOP_LEVEL = ("preset", "out")


def _field_types() -> dict[str, Any]:
    """Dotted key -> resolved type annotation, for every leaf field."""
    out: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{name}.{f.name}"] = hints[f.name]
    hints = typing.get_type_hints(Config)
    for name in _TOP_LEVEL:
        out[name] = hints[name]
    return out


FIELD_TYPES: dict[str, Any] = _field_types()
ALL_KEYS: tuple[str, ...] = tuple(FIELD_TYPES)


# --------------------------------------------------------------------------------------
# Presets (nested overrides of the defaults above; edit the numbers here)
# --------------------------------------------------------------------------------------

_FMNIST_MEAN, _FMNIST_STD = [0.2860], [0.3530]
_CIFAR10_MEAN, _CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Official swav_800ep_pretrain.sh: 64 GPUs x 64 = 4096. The script passes
    # --queue_length 3840, but the official code rounds it down to a multiple of the global
    # batch (3840 % 4096 -> 0), so the queue is effectively off at this batch size.
    "imagenet": {
        "data": {"source": "data/imagenet/train", "workers": 10},
        "model": {"arch": "resnet50", "hidden_mlp": 2048, "feat_dim": 128,
                  "nmb_prototypes": 3000},
        "swav": {"queue_length": 0, "epoch_queue_starts": 15, "freeze_prototypes_epochs": 1.0},
        "optim": {"optimizer": "lars", "lr": 4.8, "final_lr": 0.0048, "warmup_epochs": 10.0,
                  "start_warmup": 0.3},
        "train": {"epochs": 800, "batch_size": 4096, "precision": "fp16"},
    },
    # Official swav_200ep_bs256_pretrain.sh (8 GPUs x 32).
    "imagenet-bs256": {
        "data": {"source": "data/imagenet/train", "workers": 10},
        "model": {"arch": "resnet50"},
        "swav": {"queue_length": 3840, "epoch_queue_starts": 15, "freeze_prototypes_epochs": 1.0},
        "optim": {"optimizer": "lars", "lr": 0.6, "final_lr": 0.0006, "warmup_epochs": 0.0,
                  "start_warmup": 0.0},
        "train": {"epochs": 200, "batch_size": 256, "precision": "fp16"},
    },
    "cifar": {
        "data": {"source": "cifar10"},
        "augment": {"size_crops": [32, 16], "nmb_crops": [2, 4],
                    "min_scale_crops": [0.2, 0.08], "max_scale_crops": [1.0, 0.2],
                    "jitter_strength": 0.5, "blur_prob": 0.0,
                    "mean": _CIFAR10_MEAN, "std": _CIFAR10_STD},
        "model": {"arch": "resnet18", "small_stem": True, "hidden_mlp": 2048, "feat_dim": 128,
                  "nmb_prototypes": 3000},
        "swav": {"queue_length": 3840, "epoch_queue_starts": 50, "freeze_prototypes_epochs": 2.0},
        "optim": {"optimizer": "lars", "lr": 0.6, "final_lr": 0.0006, "warmup_epochs": 10.0,
                  "start_warmup": 0.0},
        "train": {"epochs": 500, "batch_size": 256},
    },
    "fashion-mnist": {
        # Tuned for a 10-minute CPU budget (bench/quality.py, docs/benchmarks.md): at equal images
        # seen, small batches (more updates) and a high LARS lr learn fastest; freezing the
        # prototypes or warming up for a whole epoch wastes most of such a short run; bf16
        # (precision auto) and channels_last make the CPU step 2.2x faster than fp32 NCHW.
        # Tried and not better within 10 minutes: 2x28+6x16 crops, 20/12 px crops, K = 30, AdamW,
        # a queue from the start; tau 0.07/0.2 and epsilon 0.03/0.08 are clearly worse.
        # The final kNN uses all 60k training images as its memory, as `swav eval knn` does.
        "data": {"source": "fashion-mnist", "workers": 0},
        "augment": {"size_crops": [28, 16], "nmb_crops": [2, 4],
                    "min_scale_crops": [0.3, 0.1], "max_scale_crops": [1.0, 0.3],
                    "jitter_strength": 0.5, "grayscale_prob": 0.0, "blur_prob": 0.0,
                    "mean": _FMNIST_MEAN, "std": _FMNIST_STD},
        "model": {"arch": "resnet18", "in_chans": 1, "small_stem": True, "width_per_group": 16,
                  "hidden_mlp": 512, "feat_dim": 128, "nmb_prototypes": 100},
        "swav": {"queue_length": 0, "freeze_prototypes_epochs": 0.1},
        "optim": {"optimizer": "lars", "lr": 4.8, "final_lr": 0.0048, "warmup_epochs": 0.2,
                  "start_warmup": 0.0},
        "train": {"epochs": 100, "batch_size": 64, "time_budget_minutes": 10.0,
                  "final_knn": True, "knn_max_train": 0,
                  "precision": "auto", "channels_last": True},
    },
    "smoke": {
        "data": {"source": "fashion-mnist", "subset": 512, "workers": 0},
        "augment": {"size_crops": [28, 16], "nmb_crops": [2, 2],
                    "min_scale_crops": [0.3, 0.1], "max_scale_crops": [1.0, 0.3],
                    "grayscale_prob": 0.0, "blur_prob": 0.0,
                    "mean": _FMNIST_MEAN, "std": _FMNIST_STD},
        "model": {"arch": "resnet18", "in_chans": 1, "small_stem": True, "width_per_group": 8,
                  "hidden_mlp": 32, "feat_dim": 16, "nmb_prototypes": 20},
        "swav": {"queue_length": 0, "freeze_prototypes_epochs": 0.0},
        "optim": {"optimizer": "lars", "lr": 0.3, "final_lr": 0.0003, "warmup_epochs": 0.0,
                  "start_warmup": 0.0},
        "train": {"epochs": 2, "batch_size": 64, "log_every": 1, "precision": "fp32"},
    },
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "imagenet": "official 800-epoch ImageNet recipe: ResNet-50, batch 4096, LARS lr 4.8, "
                "2x224+6x96 crops, fp16 (set data.source to your ImageNet train folder)",
    "imagenet-bs256": "official 200-epoch batch-256 ImageNet recipe: LARS lr 0.6, queue 3840 "
                      "from epoch 15, fp16 (set data.source to your ImageNet train folder)",
    "cifar": "CIFAR-10, ResNet-18 small stem, 2x32+4x16 crops, batch 256, queue 3840 from "
             "epoch 50, 500 epochs",
    "fashion-mnist": "Fashion-MNIST on one CPU or GPU in about 10 minutes: narrow ResNet-18, "
                     "2x28+4x16 crops, 100 prototypes, batch 64, LARS lr 4.8, bf16 where native, "
                     "channels_last",
    "smoke": "tiny end-to-end check (512 Fashion-MNIST images, 2 epochs, seconds on a CPU)",
}


def list_presets() -> list[tuple[str, str]]:
    """``[(name, one-line description), ...]`` for every preset."""
    return [(name, PRESET_DESCRIPTIONS.get(name, "")) for name in PRESETS]


# --------------------------------------------------------------------------------------
# Conversion and coercion
# --------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


class _CoerceError(Exception):
    pass


def _coerce_scalar(value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _CoerceError
    if tp is int:
        if isinstance(value, bool):
            raise _CoerceError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    value = float(value.strip())
                except ValueError:
                    raise _CoerceError from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _CoerceError
    if tp is float:
        if isinstance(value, bool):
            raise _CoerceError
        if isinstance(value, str):
            try:
                value = float(value.strip())  # YAML reads "1e-6" as a string
            except ValueError:
                raise _CoerceError from None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise _CoerceError
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _CoerceError
    raise _CoerceError


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the field type ``tp`` or raise a ConfigError naming the key."""
    try:
        origin = typing.get_origin(tp)
        if origin is list:
            (elem,) = typing.get_args(tp)
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):
                    text = text[1:-1]
                parts = [p.strip() for p in text.split(",")] if text else []
                value = [yaml.safe_load(p) if p else p for p in parts]
            elif not isinstance(value, (list, tuple)):
                value = [value]  # a scalar for a one-element list, e.g. mean=0.5
            return [_coerce_scalar(v, elem) for v in value]
        args = typing.get_args(tp)
        if type(None) in args:  # Optional[X]
            if value is None or (isinstance(value, str)
                                 and value.strip().lower() in ("", "none", "null")):
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return _coerce_scalar(value, inner)
        return _coerce_scalar(value, tp)
    except (_CoerceError, yaml.YAMLError):
        raise ConfigError(f"{key}: cannot use {reprlib.repr(value)} ({type(value).__name__}); expected "
                          f"{_type_name(tp)}") from None


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.5)
    if not close and "." in key:  # e.g. 'lrr' in a wrong section: match on the leaf name
        leaf = key.rsplit(".", 1)[1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in ALL_KEYS}
        hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[hit[0]]] if hit else []
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; valid sections are {', '.join(SECTIONS)} (see config_help())"


def _set(cfg: Config, key: str, value: Any) -> None:
    if key not in FIELD_TYPES:
        raise ConfigError(_suggest(key))
    value = _coerce(key, value, FIELD_TYPES[key])
    if "." in key:
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    else:
        setattr(cfg, key, value)


def flatten(mapping: Mapping[str, Any], label: str = "config") -> dict[str, Any]:
    """Nested ``{section: {key: value}}`` (or dotted keys) -> ``{"section.key": value}``.

    Unknown sections are kept as dotted keys so that the caller reports them with a
    suggestion.  Raises ConfigError when a section is not a mapping.
    """
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        k = str(k)
        if k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{label}: section {k!r} must be a mapping of keys to values, "
                                  f"got {type(v).__name__}")
            for sub, val in v.items():
                flat[f"{k}.{sub}"] = val
        elif isinstance(v, Mapping) and "." not in k and k not in _TOP_LEVEL:
            for sub, val in v.items():  # unknown section: report each key with a suggestion
                flat[f"{k}.{sub}"] = val
        else:
            flat[k] = v
    return flat


def _apply(cfg: Config, flat: Mapping[str, Any]) -> None:
    """Set every dotted key; report all unknown keys and bad values at once."""
    problems = []
    for key, value in flat.items():
        try:
            _set(cfg, key, value)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested plain dict (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def from_dict(d: Mapping[str, Any]) -> Config:
    """Build a Config from a nested dict.

    Strict: unknown sections or keys and values of the wrong type raise ConfigError.
    Keys that are absent keep the dataclass defaults (so configs saved by older versions load).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(d).__name__}")
    cfg = Config()
    _apply(cfg, flatten(d))
    return cfg


def _preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} Available: {', '.join(PRESETS)}")
    return PRESETS[name]


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in FIELD_TYPES:
        raise ConfigError(_suggest(key))
    tp = FIELD_TYPES[key]
    text = raw.strip()
    if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                     and str in typing.get_args(tp)):
        # keep strings verbatim (paths such as "~/data" or "cuda:0"), minus surrounding quotes
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return key, text
    try:
        value = yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        value = text
    return key, value


def make_config(preset: str | None = "fashion-mnist", config_file: str | os.PathLike | None = None,
                overrides: Iterable[str] = (), **flags: Any) -> Config:
    """Build a Config: defaults < preset < YAML file < flags < ``--set`` overrides.

    Args:
        preset: preset name (see :func:`list_presets`); ``""`` or None = the plain defaults
            (the official ImageNet recipe).  A ``preset:`` key inside the YAML file replaces
            this argument (the file has the higher precedence).
        config_file: YAML file with a nested mapping (``train: {epochs: 5}``) or dotted keys.
        overrides: ``"section.key=value"`` strings; values are parsed as YAML, then coerced to
            the field type (lists as ``[1,2]`` or ``1,2``).
        **flags: dotted keys, e.g. ``**{"train.epochs": 5}``; ``None`` values are ignored
            (argparse options that were not given).

    The result is not validated: call :func:`validate` with the real world size.
    """
    file_flat: dict[str, Any] = {}
    if config_file is not None:
        file_flat = flatten(read_yaml(config_file), label=str(config_file))
        if file_flat.get("preset") is not None:
            preset = str(file_flat["preset"])
    preset = preset or ""
    cfg = Config()
    if preset:
        _apply(cfg, flatten(_preset_overrides(preset), label=f"preset {preset}"))
    cfg.preset = preset
    if file_flat:
        try:
            _apply(cfg, file_flat)
        except ConfigError as e:
            raise ConfigError([f"{config_file}: {p}" for p in e.problems]) from None
    _apply(cfg, {k: v for k, v in flags.items() if v is not None})
    problems, parsed = [], {}
    for item in overrides:
        try:
            key, value = _parse_set(item)
            parsed[key] = value
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        _apply(cfg, parsed)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


# --------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------

def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (files over 1 MB are refused)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {size} bytes; refusing files over "
                          f"{MAX_YAML_BYTES} bytes (is it really a config?)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (section: {{key: value}}) "
                          f"at the top level, got {type(data).__name__}")
    return data


def load_yaml(path: str | os.PathLike) -> Config:
    """Load a config saved by :func:`save_yaml` (strict, see :func:`from_dict`)."""
    try:
        return from_dict(read_yaml(path))
    except ConfigError as e:
        if all(str(path) in p for p in e.problems):
            raise
        raise ConfigError([f"{path}: {p}" for p in e.problems]) from None


def save_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write the config as YAML atomically (temporary file in the same folder + os.replace)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------
# Comparison and help
# --------------------------------------------------------------------------------------

RESUME_FREE_FIELDS: frozenset[str] = frozenset({
    "out", "preset", "data.workers", "data.root", "train.device", "train.log_every",
    "train.knn_every", "train.save_every_steps", "train.checkpoint_every",
    "train.knn_max_train", "train.final_knn",
})


def _flat_values(cfg: Config) -> dict[str, Any]:
    return flatten(to_dict(cfg))


def diff_configs(a: Config, b: Config, ignore: Iterable[str] = RESUME_FREE_FIELDS) -> list[str]:
    """``["key: a_value != b_value", ...]`` for every field that differs (ignored keys skipped)."""
    skip = set(ignore)
    fa, fb = _flat_values(a), _flat_values(b)
    return [f"{k}: {fa[k]!r} != {fb[k]!r}" for k in fa if k not in skip and fa[k] != fb[k]]


def config_help(cfg: Config | None = None) -> dict[str, tuple[str, Any, str]]:
    """Dotted key -> (type name, default, help text), in schema order.

    ``default`` is taken from ``cfg`` when given (e.g. a preset), else from the dataclasses.
    """
    values = _flat_values(cfg if cfg is not None else Config())
    out: dict[str, tuple[str, Any, str]] = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            out[key] = (_type_name(FIELD_TYPES[key]), values[key], f.metadata.get("help", ""))
    for f in dataclasses.fields(Config):
        if f.name in _TOP_LEVEL:
            out[f.name] = (_type_name(FIELD_TYPES[f.name]), values[f.name],
                           f.metadata.get("help", ""))
    return out


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

def _nearest_multiples(n: int, m: int) -> str:
    lo = max(m, (n // m) * m)
    hi = lo if lo >= n else lo + m
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def validate(cfg: Config, world_size: int = 1) -> list[str]:
    """Check the whole config; raise one ConfigError listing every problem with advice.

    Returns a (possibly empty) list of warnings: legal settings that are probably unintended.
    """
    errors: list[str] = []
    warnings: list[str] = []
    err = errors.append
    d, a, m, s, o, t = cfg.data, cfg.augment, cfg.model, cfg.swav, cfg.optim, cfg.train

    def at_least(key: str, value: float, low: float, advice: str = "") -> None:
        if value < low:
            err(f"{key} = {value!r} must be >= {low}" + (f"; {advice}" if advice else ""))

    def positive(key: str, value: float, advice: str = "") -> None:
        if not value > 0:
            err(f"{key} = {value!r} must be > 0" + (f"; {advice}" if advice else ""))

    def prob(key: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            err(f"{key} = {value!r} is a probability and must lie in [0, 1]")

    def choice(key: str, value: str, options: Iterable[str]) -> None:
        options = list(options)
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            err(f"{key} = {value!r} is not one of {', '.join(options)}{hint}")

    if world_size < 1:
        err(f"world_size = {world_size} must be >= 1")
        world_size = 1

    # data
    if not str(d.source).strip():
        err("data.source is empty; give a built-in name (" + ", ".join(BUILTIN_SOURCES)
            + "), a folder of images or a text file of image paths")
    at_least("data.subset", d.subset, 0, "0 uses every image")
    at_least("data.workers", d.workers, 0, "0 decodes in the main process")
    at_least("data.min_size", d.min_size, 0)
    at_least("data.max_side", d.max_side, 0, "0 keeps the original size")
    if 0 < d.subset < t.batch_size:
        err(f"data.subset = {d.subset} is smaller than the global batch train.batch_size = "
            f"{t.batch_size}: no full batch can be drawn; raise the subset or lower the batch")

    # augment
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
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
        prob(f"augment.{key}", getattr(a, key))
    at_least("augment.jitter_strength", a.jitter_strength, 0.0, "0 disables colour jitter")
    if len(a.blur_sigma) != 2:
        err(f"augment.blur_sigma = {a.blur_sigma} must be [min, max], e.g. [0.1, 2.0]")
    elif not 0.0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        err(f"augment.blur_sigma = {a.blur_sigma} must satisfy 0 < min <= max")
    for key, vals in (("augment.mean", a.mean), ("augment.std", a.std)):
        if len(vals) != m.in_chans:
            err(f"{key} has {len(vals)} value(s) but model.in_chans = {m.in_chans}; give one per "
                "input channel")
    for i, v in enumerate(a.std):
        if not v > 0:
            err(f"augment.std[{i}] = {v} must be > 0")

    # model
    choice("model.arch", m.arch, ARCHS)
    at_least("model.width_per_group", m.width_per_group, 1)
    at_least("model.widen", m.widen, 1)
    at_least("model.in_chans", m.in_chans, 1)
    at_least("model.hidden_mlp", m.hidden_mlp, 0, "0 makes the head a single linear layer")
    at_least("model.feat_dim", m.feat_dim, 1)
    at_least("model.nmb_prototypes", m.nmb_prototypes, 1, "3000 in the paper for ImageNet")

    # swav
    positive("swav.temperature", s.temperature, "0.1 in the paper")
    positive("swav.epsilon", s.epsilon, "0.05 in the paper")
    if 0 < s.epsilon < 0.01:
        warnings.append(f"swav.epsilon = {s.epsilon} is very small: codes become nearly one-hot "
                        "and training may collapse; the paper uses 0.05 (0.03 at most lower)")
    at_least("swav.sinkhorn_iterations", s.sinkhorn_iterations, 1, "3 in the paper")
    if not s.crops_for_assign:
        err("swav.crops_for_assign is empty; use the large crops, e.g. [0, 1]")
    for c in s.crops_for_assign:
        if not 0 <= c < n_crops:
            err(f"swav.crops_for_assign names crop {c}, but augment.nmb_crops = {a.nmb_crops} "
                f"gives crops 0..{n_crops - 1}")
    dups = sorted({c for c in s.crops_for_assign if s.crops_for_assign.count(c) > 1})
    if dups:
        err(f"swav.crops_for_assign = {s.crops_for_assign} repeats crop(s) {dups}")
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
            warnings.append(f"swav.epoch_queue_starts = {s.epoch_queue_starts} >= train.epochs "
                            f"= {t.epochs}: the queue is never used")
    at_least("swav.epoch_queue_starts", s.epoch_queue_starts, 0)
    at_least("swav.freeze_prototypes_epochs", s.freeze_prototypes_epochs, 0.0,
             "0 never freezes; the paper freezes during the first epoch")

    # optim
    choice("optim.optimizer", o.optimizer, OPTIMIZER_NAMES)
    positive("optim.lr", o.lr, "0.6 for batch 256 with LARS, scale linearly with the batch")
    at_least("optim.final_lr", o.final_lr, 0.0)
    if o.final_lr > o.lr > 0:
        warnings.append(f"optim.final_lr = {o.final_lr} exceeds optim.lr = {o.lr}: the cosine "
                        "schedule will increase the learning rate")
    at_least("optim.warmup_epochs", o.warmup_epochs, 0.0)
    if o.warmup_epochs > t.epochs >= 1:
        err(f"optim.warmup_epochs = {o.warmup_epochs} exceeds train.epochs = {t.epochs}; "
            "shorten the warmup")
    at_least("optim.start_warmup", o.start_warmup, 0.0)
    at_least("optim.weight_decay", o.weight_decay, 0.0, "1e-6 in the paper")
    if not 0.0 <= o.momentum < 1.0:
        err(f"optim.momentum = {o.momentum} must lie in [0, 1); 0.9 in the paper")
    positive("optim.lars_eta", o.lars_eta, "0.001 in the paper")
    if o.optimizer == "adamw" and o.lr > 0.05:
        warnings.append(f"optim.lr = {o.lr} is a LARS/SGD-sized rate; AdamW wants ~1e-3")

    # train
    at_least("train.epochs", t.epochs, 1)
    if t.batch_size < 1:
        err(f"train.batch_size = {t.batch_size} must be >= 1")
    elif t.batch_size % world_size:
        err(f"train.batch_size = {t.batch_size} (global) does not divide evenly over "
            f"{world_size} processes; use {_nearest_multiples(t.batch_size, world_size)}")
    at_least("train.time_budget_minutes", t.time_budget_minutes, 0.0, "0 = no budget")
    choice("train.precision", t.precision, PRECISIONS)
    if not _DEVICE_RE.match(str(t.device)):
        err(f"train.device = {t.device!r} is not one of auto, cpu, cuda, cuda:N")
    at_least("train.seed", t.seed, 0)
    at_least("train.checkpoint_every", t.checkpoint_every, 1)
    at_least("train.save_every_steps", t.save_every_steps, 0, "0 = only at epoch ends")
    at_least("train.log_every", t.log_every, 1)
    at_least("train.nan_patience", t.nan_patience, 1)
    at_least("train.knn_every", t.knn_every, 0, "0 turns the kNN monitor off")
    at_least("train.knn_k", t.knn_k, 1)
    if t.knn_every > 0 and d.source not in BUILTIN_SOURCES:
        warnings.append(f"train.knn_every = {t.knn_every} but data.source = {d.source!r} has no "
                        "labels; the kNN monitor needs a built-in labelled source")
    if t.device == "cpu" and t.precision == "fp16":
        warnings.append("train.precision = fp16 on the CPU is slow; use bf16 or fp32")

    if errors:
        raise ConfigError(errors)
    return warnings

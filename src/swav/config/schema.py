"""The typed schema of a run's configuration: the section dataclasses with every field's default
and help string, the allowed values (OPTIMIZER_NAMES, PRECISIONS, BUILTIN_SOURCES) and
:class:`ConfigError`. The backbones are the registry's (``swav.models.registry``: ``list_backbones()``
and the ``timm/``, ``torchvision/`` and ``module/`` families), not a list kept here."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from swav.data.builtin import BUILTIN_NAMES


OPTIMIZER_NAMES = ("lars", "sgd", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUILTIN_SOURCES = BUILTIN_NAMES  # from the one table of built-ins (swav.data.builtin)
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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
    max_side: int | str = _f("auto", "decode images at the size the crops need, in the workers: auto = "
                                     "shrink each image to a geometric-mean side D = max over crop groups of "
                                     "size / sqrt(3/4 * min_scale) (692 px for the paper's 224 px crops at "
                                     "scale 0.14; at most 6x the largest crop), longer side at most 2D: the "
                                     "smallest box a crop can draw, of any aspect ratio, still has at least "
                                     "its output's pixels, so no crop loses detail; N = longer side at most "
                                     "N; 0 = full size (the official code's decode)")


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
    erase_prob: float = _f(0.0, "probability of random erasing of each crop after normalisation "
                                "(Zhong et al. 2020; not in the paper's recipe): a box set to the mean")
    erase_scale: list[float] = _f([0.02, 0.33], "range [min, max] of the erased box's area fraction "
                                               "of the crop, 0 < min <= max < 1")
    mean: list[float] = _f([0.485, 0.456, 0.406], "per-channel normalisation mean (one value per "
                                                  "input channel)")
    std: list[float] = _f([0.228, 0.224, 0.225], "per-channel normalisation std (one value per "
                                                 "input channel; the official code uses 0.228)")


@dataclass
class ModelConfig:
    arch: str = _f("resnet50", "backbone: ours, resnet10 (one block per stage)/18/34/50/101/152 or the "
                               "wide resnet50w2/w4/w5; timm/<name> (any model timm builds, pip install "
                               "'swav[timm]'); torchvision/<name> (any torchvision classification model, "
                               "pip install 'swav[torchvision]'); the classifier is removed")
    kwargs: dict[str, Any] = _f({}, "settings for a library's constructor (timm/..., torchvision/...), e.g. "
                                    "{patch_size: 4, img_size: 28, drop_path_rate: 0.1} or --set "
                                    "model.kwargs.patch_size=4; recorded in the run like every setting")
    init_from: str | None = _f(None, "start from the weights of this file (--init-from): a swav run (folder or "
                                     "checkpoint), an official SwAV release, or a torchvision or timm state dict "
                                     "(.pt/.pth/.safetensors) of this backbone; every backbone key must be in it, "
                                     "its classifier, projection head and prototypes are named and not used; "
                                     "read at the start only, never on resume")
    width_per_group: int = _f(64, "base width of our ResNets (64 = standard); 16-32 make tiny "
                                  "models for CPU runs (ResNet only)")
    widen: int = _f(1, "width multiplier of our ResNets (the wN archs set it themselves; ResNet only)")
    in_chans: int = _f(3, "input channels: 3 for colour, 1 for grayscale data such as "
                          "Fashion-MNIST (every backbone: timm's in_chans; a torchvision model's first "
                          "convolution sums its RGB filters)")
    small_stem: bool = _f(False, "3x3 stride-1 first conv and no max-pool, for 28-64 px images; "
                                 "keep False for ImageNet-size images (ResNet only)")
    pool_size: int = _f(1, "side of the average-pooling grid over our ResNet's last feature map: 1 = "
                           "global average pooling (torchvision's); 2 keeps the coarse layout (2x2 cells, "
                           "4x the features). timm and torchvision networks pool as their library does "
                           "(timm: model.kwargs.global_pool)")
    zero_init_residual: bool = _f(False, "start the last BatchNorm of each residual branch at zero "
                                         "(Goyal et al. 2017; torchvision's option), so each block "
                                         "starts as its shortcut; False in the official code (ResNet only)")
    hidden_mlp: int = _f(2048, "hidden width of the 2-layer projection head (0 = a single linear "
                               "layer)")
    feat_dim: int = _f(128, "dimension of the L2-normalised features and prototypes (128 in the "
                            "paper)")
    nmb_prototypes: int = _f(3000, "number K of prototypes; the paper finds results insensitive "
                                   "to K (3000 for ImageNet); use ~10x the number of classes for "
                                   "small data")
    sync_bn: bool = _f(True, "synchronise BatchNorm statistics over processes; matters when the "
                             "per-process batch is small (< 64); no effect on networks without BatchNorm "
                             "(ViTs)")


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
    exclude_bias_and_bn: bool = _f(False, "exclude biases and norm layers (BatchNorm, LayerNorm, "
                                          "GroupNorm..., found by module kind) and the library's own "
                                          "list (timm's position embeddings and class token) from weight "
                                          "decay and LARS adaptation (BYOL-style; off in the official "
                                          "SwAV code; on for ViTs)")


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
    channels_last: bool | str = _f("auto", "channels-last memory format for the network and its crops: "
                                           "auto = on for bf16/fp16 (tensor-core GPUs, oneDNN bf16 on "
                                           "CPUs), off for fp32; true or false to choose")
    compile: bool | str = _f("auto", "torch.compile the model: auto = on a CUDA GPU when Triton is "
                                     "installed (the first steps take about a minute longer, later "
                                     "steps are faster), off on CPU; true or false to choose")
    knn_every: int = _f(0, "run the online kNN monitor every N epochs on a labelled built-in "
                           "source (0 = off)")
    knn_k: int = _f(20, "neighbours k of the kNN monitor (20 is customary)")
    knn_max_train: int = _f(0, "use at most this many training images as the kNN memory (0 = all); "
                               "10000 keeps the monitor to seconds on a CPU")
    recompute_bn_images: int = _f(0, "after the last step, recompute the backbone's BatchNorm running "
                                     "statistics on this many whole training images (the evaluation "
                                     "transform; 'precise BN'); training mixes large and small crops "
                                     "through the same BatchNorm, so its running averages match neither. "
                                     "0 = keep them (the official recipe)")
    final_knn: bool = _f(False, "at the end, compare the learned backbone with the same network at "
                                "initialisation and with the raw pixels: kNN and a linear probe on frozen "
                                "features, printed and saved in RUN/eval/final.json (labelled sources)")
    final_linear_epochs: int = _f(30, "epochs of the final comparison's linear probe (frozen, standardised "
                                      "features; 0 = kNN only); 30 take seconds on a CPU")


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
TOP_LEVEL = ("preset", "out")


def _field_types() -> dict[str, Any]:
    """Dotted key -> resolved type annotation, for every leaf field."""
    out: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{name}.{f.name}"] = hints[f.name]
    hints = typing.get_type_hints(Config)
    for name in TOP_LEVEL:
        out[name] = hints[name]
    return out


FIELD_TYPES: dict[str, Any] = _field_types()
ALL_KEYS: tuple[str, ...] = tuple(FIELD_TYPES)


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "dict"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))

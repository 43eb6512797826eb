"""The named presets: nested overrides of the schema defaults, one per recipe, with a one-line
description each (edit the numbers here)."""

from __future__ import annotations

import difflib
from typing import Any

from swav.config.schema import ConfigError
from swav.data.builtin import BUILTINS  # the one table of built-ins: their mean/std


_FMNIST_MEAN, _FMNIST_STD = list(BUILTINS["fashion-mnist"].mean), list(BUILTINS["fashion-mnist"].std)
_CIFAR10_MEAN, _CIFAR10_STD = list(BUILTINS["cifar10"].mean), list(BUILTINS["cifar10"].std)

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
        # Tuned for a 10-minute CPU budget (bench/quality.py, docs/benchmarks.md), ranked by kNN
        # at a fixed wall-clock budget: a ResNet-10 (one block per stage) steps 1.5x faster than
        # the ResNet-18 and learns more in 5 minutes (kNN 83.95 against 81.57 %); with it the
        # paper's 2x28+6x16 crops add 1.4 points (85.32 %) and LARS lr 2.4 instead of 4.8 another
        # 0.8 (86.07 %). At equal images seen, small batches (more updates) learn fastest;
        # freezing the prototypes or warming up for a whole epoch wastes most of such a short
        # run; bf16 (precision auto) and channels_last make the CPU step 2.2x faster than fp32
        # NCHW. Tried and not better within 5-10 minutes: width 24/32, batch 256, K = 30/300, a
        # queue (from epoch 0 or 1), milder crop scales, 2x28+8x16 crops, 24/14 px crops, AdamW;
        # tau 0.07/0.2 and epsilon 0.03/0.08 are clearly worse; session 6: lr 1.2, batch 32 (also
        # at 10 minutes), hidden_mlp 2048, the paper's crop scales, jitter 1.0, an EMA of the
        # weights, recomputed BatchNorm statistics (train.recompute_bn_images: +0.2 at 5 min, 0 at
        # 10). Most of the kNN is reached in the first epoch. The final kNN uses all 60k training
        # images as its memory. Session 7: the global average pooling was the ceiling (kNN of a
        # trained backbone's last map pooled to 2x2: 86.5 against 84.6 %), so the backbone's features
        # are a grid of that map: 2x2 (pool_size 2, 512-d) gave 87.25 against about 86.1 % at equal
        # steps (4 epochs) and 87.5-87.7 % in 10 minutes; 4x4 (the 28-px map itself, 2,048-d) 88.85 %
        # in 10 minutes. Not better with the 2x2 grid: a stride-1 last stage (86.11, GAP), lr 1.2
        # (87.17), K = 300 (87.19), hidden_mlp 1024 (86.81), jitter 0.25 (84.88) / 0.75 (87.48) /
        # 1.0 (collapsed, loss at ln K). With the 4x4 grid the curve is flat from 10 minutes on
        # (88.4 % at 5, 89.1-89.4 % at 10, 20 and 40 minutes); the head's first layer (2,048 x 512)
        # runs in bf16 under autocast, which made the step 1.3-1.4x faster. Session 9: the large
        # crops cover at least half the image (min scale 0.5, was 0.3): +1.0 point at equal steps
        # (89.25 against 88.22 %, seed 2, 4 epochs), as much as width 24 at no cost in time; the
        # grid's features reward views closer to the whole image. Not better with the grid: a
        # queue (1,024: 83.8 %, 3,840: 73.2 %), lr 4.8, weight decay 1e-4/1e-3, width 32 at 10
        # minutes (88.62 %). Session 10, at equal steps: min scale 0.6/0.7 (89.35/89.11 %), larger
        # small crops (88.28/89.05 %), random erasing 0.5/0.25 (88.58/88.96 %), LARS and weight
        # decay off biases and BatchNorm (89.08 %, with eta 0.002 89.03 %). Session 11: each
        # residual branch starts at zero (model.zero_init_residual): 89.13 % at equal steps (the
        # same within the screen's spread) while the network at init scores 78.88 instead of
        # 84.64 % on seed 2: the demo's comparison with init is against a weaker random network,
        # not a better-trained one (docs/benchmarks.md, session 11).
        "data": {"source": "fashion-mnist", "workers": 0},
        "augment": {"size_crops": [28, 16], "nmb_crops": [2, 6],
                    "min_scale_crops": [0.5, 0.1], "max_scale_crops": [1.0, 0.3],
                    "jitter_strength": 0.5, "grayscale_prob": 0.0, "blur_prob": 0.0,
                    "mean": _FMNIST_MEAN, "std": _FMNIST_STD},
        "model": {"arch": "resnet10", "in_chans": 1, "small_stem": True, "width_per_group": 16,
                  "pool_size": 4, "zero_init_residual": True, "hidden_mlp": 512, "feat_dim": 128,
                  "nmb_prototypes": 100},
        "swav": {"queue_length": 0, "freeze_prototypes_epochs": 0.1},
        "optim": {"optimizer": "lars", "lr": 2.4, "final_lr": 0.0024, "warmup_epochs": 0.2,
                  "start_warmup": 0.0},
        "train": {"epochs": 100, "batch_size": 64, "time_budget_minutes": 10.0,
                  "final_knn": True, "knn_max_train": 0,
                  "precision": "auto", "channels_last": True},
    },
    "fashion-mnist-vit": {
        # A ViT on Fashion-MNIST in 10 CPU minutes (issue 21; needs timm: pip install 'swav[timm]'):
        # timm's vit_tiny made small for 28-px images (4-px patches: a 7x7 grid for the large crops,
        # 4x4 for the small ones; position embeddings interpolated per crop size), trained with
        # AdamW, a warm-up and weight decay off norms, biases, the position embeddings and the class
        # token, as ViTs need (DINO's recipe). Screen and seeds: docs/benchmarks.md, session 12.
        "data": {"source": "fashion-mnist", "workers": 0},
        "augment": {"size_crops": [28, 16], "nmb_crops": [2, 6],
                    "min_scale_crops": [0.5, 0.1], "max_scale_crops": [1.0, 0.3],
                    "jitter_strength": 0.5, "grayscale_prob": 0.0, "blur_prob": 0.0,
                    "mean": _FMNIST_MEAN, "std": _FMNIST_STD},
        "model": {"arch": "timm/vit_tiny_patch16_224", "in_chans": 1,
                  "kwargs": {"patch_size": 4, "img_size": 28, "embed_dim": 96, "depth": 4, "num_heads": 3,
                             "mlp_ratio": 2.0, "drop_path_rate": 0.0, "global_pool": "avg"},
                  "hidden_mlp": 512, "feat_dim": 128, "nmb_prototypes": 100},
        "swav": {"queue_length": 0, "freeze_prototypes_epochs": 0.1},
        "optim": {"optimizer": "adamw", "lr": 0.002, "final_lr": 0.00001, "warmup_epochs": 0.2,
                  "start_warmup": 0.0, "weight_decay": 0.04, "exclude_bias_and_bn": True},
        "train": {"epochs": 100, "batch_size": 64, "time_budget_minutes": 10.0,
                  "final_knn": True, "knn_max_train": 0, "precision": "fp32"},
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
    "fashion-mnist": "Fashion-MNIST on one CPU or GPU in about 10 minutes: narrow ResNet-10 "
                     "(zero-init residuals) with 4x4-pooled features, 2x28+6x16 crops, 100 prototypes, batch 64, LARS lr 2.4, bf16 where native, "
                     "channels_last",
    "fashion-mnist-vit": "Fashion-MNIST in about 10 minutes with a small ViT (timm, 4-px patches, 6 blocks "
                         "of width 128), AdamW with warm-up, 2x28+6x16 crops (needs pip install 'swav[timm]')",
    "smoke": "tiny end-to-end check (512 Fashion-MNIST images, 2 epochs, seconds on a CPU)",
}


def list_presets() -> list[tuple[str, str]]:
    """``[(name, one-line description), ...]`` for every preset."""
    return [(name, PRESET_DESCRIPTIONS.get(name, "")) for name in PRESETS]


def preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} Available: {', '.join(PRESETS)}")
    return PRESETS[name]

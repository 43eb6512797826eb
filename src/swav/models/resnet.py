"""ResNets with torchvision's state-dict key names and the official SwAV constructor's widths.

Widths follow the official SwAV ``resnet50.py``: with ``width_per_group`` W and ``widen`` w, the
stem has W*w channels, the four stages have planes W*w * (1, 2, 4, 8), a bottleneck's inner width
is int(planes * W / 64) and its output planes * 4. W = 64, w = 1 is torchvision's ResNet; the wide
SwAV models RN50-w2/w4/w5 multiply every width (they are not torchvision's wide_resnet50_2).
For basic blocks (ResNet-18/34) the stage planes are W*w * (1, 2, 4, 8).

Key names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``) so weights move
both ways. The small-image stem (3x3 stride-1 conv, no max-pool) keeps 28-64 px inputs from being
downsampled 4x before the first stage.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swav.models.families import Family

__all__ = ["ResNetFamily", "ResNet", "BasicBlock", "Bottleneck", "GridPool", "resnet_kwargs_from_state_dict", "resnet_name",
           "resnet_arch", "RESNET_SPECS"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class GridPool(nn.Module):
    """Average pooling of a feature map (B, C, h, w) to a p x p grid: the same values as
    ``nn.AdaptiveAvgPool2d(p)`` (torchvision's ``avgpool`` with ``p`` = 1), with two exact shortcuts
    that matter on a CPU, where the adaptive kernel's backward is slow: a map already p x p is
    returned as it is, and a map whose sides divide p (the 2x2 map of a 16-px crop, p = 4) is
    replicated, which is what adaptive pooling computes there (each grid cell averages exactly one
    map cell: rows floor(i h / p) for i < p). Every other size goes through adaptive pooling.
    """

    def __init__(self, pool_size: int):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool_size
        h, w = x.shape[-2:]
        if h == p and w == p:
            return x
        if h < p and w < p and p % h == 0 and p % w == 0:
            # grid cell (i, j) <- map cell (i // (p / h), j // (p / w)); index_select's backward
            # sums the replicated gradients, as adaptive pooling's backward does
            rows = torch.arange(p, device=x.device) // (p // h)
            cols = torch.arange(p, device=x.device) // (p // w)
            index = (rows[:, None] * w + cols[None, :]).reshape(-1)  # (p*p,) into the flattened map
            return torch.flatten(x, 2).index_select(2, index).unflatten(2, (p, p))
        return F.adaptive_avg_pool2d(x, (p, p))

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0))  # inner width of the official constructor
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # stride on the 3x3 conv (ResNet v1.5, as official)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# name -> (block, layers, widen)
RESNET_SPECS: dict[str, tuple[type[nn.Module], list[int], int]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1], 1),
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 1),
    "resnet50w2": (Bottleneck, [3, 4, 6, 3], 2),
    "resnet50w4": (Bottleneck, [3, 4, 6, 3], 4),
    "resnet50w5": (Bottleneck, [3, 4, 6, 3], 5),
}


class ResNet(nn.Module):
    """A ResNet backbone. ``forward`` returns pooled features (B, num_features), or logits when
    ``num_classes > 0``; ``forward_features`` returns the last feature map.

    Args:
        block, layers: block type and blocks per stage.
        width_per_group: W of the official constructor (64 = standard widths).
        widen: width multiplier w (RN50-w2/w4/w5).
        in_chans: input channels (1 for grayscale data such as Fashion-MNIST).
        small_stem: 3x3 stride-1 first conv and no max-pool, for 28-64 px images.
        num_classes: size of the final ``fc`` layer; 0 = no fc (SwAV pretraining).
        zero_init_residual: start each residual branch's last BatchNorm at zero.
        pool_size: side of the average-pooling grid over the last feature map (1 = global average
            pooling, as torchvision); the pooled features are flattened (C * pool_size**2 of them).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], *, width_per_group: int = 64, widen: int = 1,
                 in_chans: int = 3, small_stem: bool = False, num_classes: int = 0, zero_init_residual: bool = False,
                 pool_size: int = 1):
        super().__init__()
        base = width_per_group * widen
        self.width_per_group = width_per_group
        self.inplanes = base
        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, base, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            # official: ConstantPad2d(1) + padding 2 == torchvision's padding 3
            self.conv1 = nn.Conv2d(in_chans, base, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.pool_size = pool_size
        self.avgpool = GridPool(pool_size)
        self.num_features = base * 8 * block.expansion * pool_size * pool_size
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.width_per_group)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, self.width_per_group) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> last feature map (B, num_features, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> pooled features (B, num_features), or logits when fc exists."""
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return x if self.fc is None else self.fc(x)


_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.")


def resnet_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Infer the constructor arguments of a ResNet from its (prefix-free) state dict.

    Returns a dict with ``block``, ``layers``, ``width_per_group``, ``widen``, ``in_chans``,
    ``small_stem`` and ``num_classes``. Raises ValueError naming what is missing.
    """
    if "conv1.weight" not in state_dict or "layer1.0.conv1.weight" not in state_dict:
        found = sorted(state_dict)[:8]
        raise ValueError(f"not a ResNet state dict: no 'conv1.weight' / 'layer1.0.conv1.weight' (first keys: {found})")
    counts = [0, 0, 0, 0]
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
    if min(counts) == 0:
        raise ValueError(f"ResNet state dict lacks a stage: blocks per stage {counts}")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    stem = state_dict["conv1.weight"]
    stem_width = stem.shape[0]
    in_chans = stem.shape[1]
    small_stem = stem.shape[-1] == 3
    if bottleneck:
        inner = state_dict["layer1.0.conv1.weight"].shape[0]  # = stem_width * W / 64
        width_per_group = (64 * inner) // stem_width
        if width_per_group < 1 or stem_width % width_per_group:
            raise ValueError(f"cannot infer width_per_group from stem {stem_width} and inner width {inner}")
        widen = stem_width // width_per_group
    else:
        width_per_group, widen = stem_width, 1
    fc = state_dict.get("fc.weight")
    return {
        "block": Bottleneck if bottleneck else BasicBlock,
        "layers": counts,
        "width_per_group": width_per_group,
        "widen": widen,
        "in_chans": in_chans,
        "small_stem": small_stem,
        "num_classes": 0 if fc is None else fc.shape[0],
    }


# --------------------------------------------------------------------------------------------
# the family of our ResNets (the default, the parity-tested path)
# --------------------------------------------------------------------------------------------
class ResNetFamily(Family):
    """Our ResNets: torchvision's key names, the official SwAV widths, the small stem, the pooling
    grid and zero-init residuals (``model.width_per_group``, ``widen``, ``small_stem``, ``pool_size``,
    ``zero_init_residual``). They take any input size (every stride-2 layer is padded)."""

    name = "swav ResNet"
    layout = "torchvision ResNet"
    reads = ("in_chans", "width_per_group", "widen", "small_stem", "pool_size", "zero_init_residual")
    export_formats = ("torchvision", "safetensors", "official", "onnx")
    example = ("resnet18", {"width_per_group": 8, "small_stem": True, "pool_size": 2})

    def owns(self, arch: str) -> bool:
        return arch in RESNET_SPECS

    def names(self) -> list[str]:
        return list(RESNET_SPECS)

    def create(self, arch: str, width_per_group: int = 64, widen: int = 1, **kw) -> ResNet:
        block, layers, arch_widen = RESNET_SPECS[arch]
        # ``widen`` multiplies the architecture's own (resnet50w2 with widen=1 is 2x wide)
        return ResNet(block, layers, width_per_group=width_per_group, widen=widen * arch_widen, **kw)

    def setting_problems(self, arch, settings):
        if settings.get("kwargs"):
            return [f"model.kwargs = {settings['kwargs']!r} is passed to a library's constructor (timm/..., "
                    f"torchvision/...); {arch} takes its settings as model.width_per_group, model.widen, "
                    "model.small_stem, model.pool_size and model.zero_init_residual"]
        return []

    def describe(self, arch, settings) -> list[str]:
        parts = [f"width {settings.get('width_per_group', 64)}"]
        if settings.get("widen", 1) != 1:
            parts.append(f"widened {settings['widen']}x")
        if settings.get("small_stem"):
            parts.append("small stem")
        if settings.get("in_chans", 3) != 3:
            parts.append(f"{settings['in_chans']} input channel(s)")
        pool = settings.get("pool_size", 1)
        if pool > 1:
            parts.append(f"features pooled to a {pool}x{pool} grid")
        if settings.get("zero_init_residual"):
            parts.append("residual branches zero at init")
        return parts

    def classifier_keys(self, backbone, state_dict):
        own = set(backbone.state_dict())
        return [k for k in state_dict if k.startswith("fc.") and k not in own]  # torchvision's classifier

    def min_input_size(self, backbone, in_chans, sizes):
        return {}  # every stride-2 convolution and the max-pool are padded: any size >= 1 works


def resnet_arch(kw: Mapping) -> str | None:
    """The RESNET_SPECS name (the one list) of a ResNet described by
    :func:`resnet_kwargs_from_state_dict`'s dict: the wide name when its widening is one, else the
    depth's (``resnet50``); None for a depth we have no name for."""
    block, layers, widen = kw["block"].__name__, list(kw["layers"]), kw.get("widen", 1)
    named = {(b.__name__, tuple(ls), w): n for n, (b, ls, w) in RESNET_SPECS.items()}
    return named.get((block, tuple(layers), widen)) or named.get((block, tuple(layers), 1))


def resnet_name(kw: Mapping) -> str:
    """The name of a ResNet described by :func:`resnet_kwargs_from_state_dict`'s dict, with what
    differs from its standard form: ``resnet10 (width 16, 1 channel(s), small stem, 4x4 pooled)``."""
    arch = resnet_arch(kw)
    widen = kw.get("widen", 1)
    wide = arch is not None and RESNET_SPECS[arch][2] == widen != 1
    extra = [] if wide or widen == 1 else [f"w{widen}"]
    if kw.get("width_per_group", 64) != 64:
        extra.append(f"width {kw['width_per_group']}")
    if kw.get("in_chans", 3) != 3:
        extra.append(f"{kw['in_chans']} channel(s)")
    if kw.get("small_stem"):
        extra.append("small stem")
    if kw.get("pool_size", 1) > 1:
        extra.append(f"{kw['pool_size']}x{kw['pool_size']} pooled")
    return (arch or f"ResNet{list(kw['layers'])}") + (f" ({', '.join(extra)})" if extra else "")

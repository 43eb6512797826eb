"""Backbone registry: ``create_backbone(name, **kw)``, ``list_backbones()``, ``register_backbone``.

Every backbone maps images (B, C, H, W) to pooled features (B, num_features) and exposes
``num_features``; any such ``nn.Module`` can also be given to ``SwAVModel`` directly.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from swav.models.heads import ProjectionHead, Prototypes
from swav.models.resnet import RESNET_SPECS, ResNet, resnet_kwargs_from_state_dict
from swav.models.swav import SwAVModel

__all__ = [
    "create_backbone", "list_backbones", "register_backbone", "ResNet", "SwAVModel",
    "ProjectionHead", "Prototypes", "resnet_kwargs_from_state_dict",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``create_backbone(name, **kw)`` call ``factory(**kw)``."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = factory


def _resnet_factory(block, layers, arch_widen):
    def make(width_per_group: int = 64, widen: int = 1, **kw) -> ResNet:
        # ``widen`` multiplies the architecture's own (resnet50w2 with widen=1 is 2x wide)
        return ResNet(block, layers, width_per_group=width_per_group, widen=widen * arch_widen, **kw)
    return make


for _name, (_block, _layers, _widen) in RESNET_SPECS.items():
    register_backbone(_name, _resnet_factory(_block, _layers, _widen))


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone, e.g. ``create_backbone("resnet50", small_stem=True)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _REGISTRY[name](**kwargs)

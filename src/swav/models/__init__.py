"""Backbones and the SwAV network.

The registry (``swav.models.registry``) is the one list of backbones: ``create_backbone(name, **kw)``,
``list_backbones()``, ``register_backbone``, and ``family_of(arch)``, the adapter every other module
asks about a network (building, parameter kinds, export names, loading). Every backbone maps images
(B, C, H, W) to pooled features (B, num_features) and exposes ``num_features``; any such
``nn.Module`` can also be given to ``SwAVModel`` directly.
"""
from __future__ import annotations

from swav.models.families import (Family, MissingExtraError, StateDictMismatchError, check_state_dict,
                                  decay_groups, is_norm)
from swav.models.heads import ProjectionHead, Prototypes
from swav.models.registry import (FAMILIES, MODULES, arch_problem, build_backbone, create_backbone, family_of,
                                  list_backbones, register_backbone)
from swav.models.resnet import RESNET_SPECS, ResNet, resnet_kwargs_from_state_dict
from swav.models.swav import SwAVModel

__all__ = [
    "create_backbone", "build_backbone", "list_backbones", "register_backbone", "family_of", "arch_problem",
    "FAMILIES", "MODULES", "Family", "MissingExtraError", "StateDictMismatchError", "check_state_dict",
    "decay_groups", "is_norm", "ResNet", "RESNET_SPECS", "SwAVModel", "ProjectionHead", "Prototypes",
    "resnet_kwargs_from_state_dict",
]

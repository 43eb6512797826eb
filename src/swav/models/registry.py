"""The one list of backbones: every family, and the functions the rest of the package asks.

``model.arch`` is ``resnet10`` ... ``resnet50w5`` (ours), a name given to :func:`register_backbone`,
``timm/<name>``, ``torchvision/<name>`` or ``module/<name>`` (a module given in Python).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping

from torch import nn

from swav.models.families import Family, MissingExtraError, ModuleFamily
from swav.models.library import TimmFamily, TorchvisionFamily
from swav.models.resnet import ResNetFamily

__all__ = ["FAMILIES", "MODULES", "family_of", "arch_problem", "create_backbone", "build_backbone",
           "register_backbone", "list_backbones", "backbone_settings"]


class RegisteredFamily(Family):
    """Names added in Python with :func:`register_backbone`: ``factory(in_chans=..., **model.kwargs)``."""

    name = "registered"
    layout = "the factory's"

    def __init__(self):
        self.factories: dict[str, Callable[..., nn.Module]] = {}

    def owns(self, arch):
        return arch in self.factories

    def names(self):
        return sorted(self.factories)

    def create(self, arch, **kwargs):
        return self.factories[arch](**kwargs)


_RESNETS = ResNetFamily()
_REGISTERED = RegisteredFamily()
MODULES = ModuleFamily()
#: every family, asked in this order which one owns an arch
FAMILIES: tuple[Family, ...] = (_RESNETS, _REGISTERED, TimmFamily(), TorchvisionFamily(), MODULES)
_EXAMPLES = "timm/<name> (e.g. timm/convnext_atto, timm/vit_tiny_patch16_224), torchvision/<name>"


def family_of(arch: str) -> Family:
    """The family that owns ``arch``; ValueError (with suggestions) for a name no family owns."""
    for family in FAMILIES:
        if family.owns(str(arch)):
            return family
    raise ValueError(_unknown(str(arch)))


def _unknown(arch: str) -> str:
    ours = list_backbones()
    close = difflib.get_close_matches(arch, ours, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if not close and "/" not in arch and arch:
        hint = f" (a timm or torchvision network? then timm/{arch} or torchvision/{arch})"
    return (f"model.arch = {arch!r} is not a known backbone{hint}: ours are {', '.join(ours)}; or "
            f"{_EXAMPLES}, or a module of yours given in Python (swav.trainer.train(cfg, backbone=...))")


def arch_problem(arch: str) -> str | None:
    """Why ``arch`` cannot be built here, or None. A missing optional library raises
    :class:`MissingExtraError` at once (one line with the ``pip install``)."""
    try:
        family = family_of(arch)
    except ValueError as e:
        return str(e)
    family.require(arch)
    return family.name_problem(arch)


def register_backbone(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``create_backbone(name, **kw)`` and ``model.arch = name`` call ``factory(**kw)`` (with
    ``in_chans`` and the entries of ``model.kwargs``); it must return a module with ``num_features``."""
    if "/" in name or any(f.owns(name) for f in FAMILIES):
        raise ValueError(f"backbone {name!r} is already registered (or names a family: timm/, torchvision/, module/)")
    _REGISTERED.factories[name] = factory


def list_backbones() -> list[str]:
    """The names listed by their families: our ResNets and the registered ones (timm and torchvision
    networks are named ``timm/<name>`` and ``torchvision/<name>``)."""
    return [n for f in FAMILIES for n in f.names()]


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone, e.g. ``create_backbone("resnet50", small_stem=True)`` or
    ``create_backbone("timm/vit_tiny_patch16_224", in_chans=1, patch_size=4, img_size=28)``."""
    family = family_of(name)
    family.require(name)
    return family.create(name, **kwargs)


def backbone_settings(model_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a family's ``create`` takes, from the ``model.*`` settings it reads."""
    return family_of(model_settings["arch"]).create_kwargs(model_settings)


def build_backbone(model_settings: Mapping[str, Any]) -> nn.Module:
    """The backbone of a config's ``model`` section (as a mapping)."""
    return create_backbone(model_settings["arch"], **backbone_settings(model_settings))


__all__ += ["MissingExtraError"]

"""Backbone families: one interface for every network SwAV trains, timm's in spirit.

A backbone maps images (B, C, H, W) to pooled features (B, num_features) and says
``num_features``. A *family* is the adapter that knows, for its networks:

* which ``model.arch`` names are its own (``resnet50``, ``timm/<name>``, ``torchvision/<name>``,
  ``module/<name>``) and which optional library (pip extra) it needs;
* which ``model.*`` settings it reads (ResNet-only settings given to another family are an error);
* how to build a network from a name and settings (:meth:`Family.create`);
* how to name its weights for export, in its library's own layout, and how to load such a file back
  strictly (:meth:`Family.export_state_dict`, :meth:`Family.load_export_state_dict`);
* which parameters its library keeps out of weight decay (timm's ``no_weight_decay()``), beside
  norms and biases, which :func:`decay_groups` finds by module kind for every family;
* the smallest input it takes (:meth:`Family.min_input_size`);
* how to synchronise its own BatchNorm layers over the processes of a job where they compute more
  than the normalisation (timm's BatchNormAct2d: :meth:`Family.sync_norm_layer`).

Build, eval, export, report and bench ask the family of an arch (:func:`family_of`); none of them
tests a family's name. Optional libraries are imported inside their family only; a missing one
raises :class:`MissingExtraError` with the one ``pip install`` line to run.
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from swav.extras import MissingExtraError, is_installed

__all__ = ["Family", "MissingExtraError", "StateDictMismatchError", "check_state_dict", "is_norm",
           "decay_groups", "RESNET_SETTINGS", "ModuleFamily", "probe_min_size", "adapt_input_weight",
           "adapt_input_channels"]

#: the ``model.*`` settings only our ResNets read (with their schema defaults, which any family accepts)
RESNET_SETTINGS: dict[str, Any] = {"width_per_group": 64, "widen": 1, "small_stem": False, "pool_size": 1,
                                   "zero_init_residual": False}


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes differ from the model's; the message lists them."""

    def __init__(self, what: str, missing=(), unexpected=(), shapes=()):
        self.missing, self.unexpected, self.shapes = list(missing), list(unexpected), list(shapes)
        parts = [what]
        for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                             ("shape mismatches", self.shapes)):
            if items:
                shown = ", ".join(items[:30]) + (f", ... ({len(items) - 30} more)" if len(items) > 30 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        super().__init__("; ".join(parts))


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str,
                     rename=lambda k: k) -> None:
    """Raise StateDictMismatchError unless ``given`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(rename(k) for k in set(expected) - set(given))
    unexpected = sorted(rename(k) for k in set(given) - set(expected))
    shapes = sorted(
        f"{rename(k)} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        raise StateDictMismatchError(what, missing, unexpected, shapes)


# --------------------------------------------------------------------------------------------
# parameter kinds: norms and biases, whatever their names
# --------------------------------------------------------------------------------------------
_NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                getattr(nn, "RMSNorm", None), nn.LocalResponseNorm) if t is not None)


_NORM_NAME = re.compile(r"Norm(Act)?\d?d?$")  # RmsNorm, SimpleNorm2d, GroupNorm1, BatchNormAct2d; not NormMlpHead


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: one of torch's (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm
    and their subclasses, such as timm's BatchNormAct2d or LayerNorm2d), or a class named as one
    (timm's own RmsNorm, SimpleNorm2d, FrozenBatchNorm2d, ...: a name ending in Norm, Norm2d, NormAct2d)."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def decay_groups(model: nn.Module, no_weight_decay: set[str] = frozenset()) -> tuple[list, list]:
    """``(decay, no_decay)`` lists of ``model``'s trainable parameters, in ``model.parameters()``
    order: every parameter of a norm layer (:func:`is_norm`), every parameter registered as
    ``bias``, and those named in ``no_weight_decay`` (full names in ``model``) go to ``no_decay``;
    the rest (conv and linear weights, prototypes, position embeddings unless named) decay."""
    kind: dict[int, bool] = {}  # id(param) -> excluded
    for mname, module in model.named_modules():
        norm = is_norm(module)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            excluded = norm or pname == "bias" or full in no_weight_decay
            kind[id(p)] = kind.get(id(p), False) or excluded
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if kind.get(id(p), False) else decay).append(p)
    return decay, no_decay


# --------------------------------------------------------------------------------------------
# input channels: RGB filters for grey (or other) input
# --------------------------------------------------------------------------------------------
def adapt_input_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first convolution's RGB filters (O, 3, kh, kw) for ``in_chans`` input channels: summed for
    1 (on a grey image the network computes what the RGB one computes on that image repeated in the
    three channels), else repeated and scaled by 3 / in_chans (timm's ``adapt_input_conv`` rule)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def adapt_input_channels(expected: Mapping[str, torch.Tensor], given: dict[str, torch.Tensor]) -> list[str]:
    """In ``given`` (a file's tensors), adapt the one convolution whose filters have 3 input channels
    where ``expected`` (the network's) has another count: an RGB file for a grey network. Returns a
    note naming it, or nothing."""
    odd = [k for k, v in given.items() if k in expected and v.ndim == 4 and v.shape[1] == 3
           and tuple(expected[k].shape) != tuple(v.shape) and expected[k].shape[0] == v.shape[0]
           and tuple(expected[k].shape[2:]) == tuple(v.shape[2:])]
    if len(odd) != 1:
        return []
    k = odd[0]
    c = expected[k].shape[1]
    given[k] = adapt_input_weight(given[k], c)
    return [f"{k}: its 3 input channels made {c} ({'RGB filters summed' if c == 1 else 'repeated, scaled 3/' + str(c)})"]


# --------------------------------------------------------------------------------------------
# the smallest input a network takes
# --------------------------------------------------------------------------------------------
def _forward_ok(backbone: nn.Module, in_chans: int, size: int) -> tuple[bool, str]:
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_chans, size, size))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        return False, (str(e).strip().splitlines() or [type(e).__name__])[0]
    n = getattr(backbone, "num_features", None)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or (n and out.shape[1] != n):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return False, f"the network returned {shape}, not pooled features (1, {n})"
    return True, ""


def probe_min_size(backbone: nn.Module, in_chans: int, sizes, extra_sizes=(224,)) -> dict[int, tuple[int | None, str]]:
    """For each crop size that the network does not take: ``size -> (smallest size that works or None,
    the network's own error)``. One forward of a 1-image batch per size tried, in eval mode (no
    statistics move, no random numbers drawn); the training mode is restored."""
    was_training = backbone.training
    backbone.eval()
    bad: dict[int, tuple[int | None, str]] = {}
    try:
        for size in sorted(set(int(s) for s in sizes)):
            ok, why = _forward_ok(backbone, in_chans, size)
            if ok:
                continue
            # every size up to twice (a total stride, a patch size that must divide it), then larger steps
            tried = list(range(size + 1, min(2 * size, size + 64) + 1))
            tried += sorted({size * 2 ** k for k in range(2, 4)} | {s for s in extra_sizes if s > tried[-1]})
            good = next((s for s in tried if _forward_ok(backbone, in_chans, s)[0]), None)
            bad[size] = (good, why)
    finally:
        backbone.train(was_training)
    return bad


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------
class Family:
    """The adapter of one family of backbones (see the module docstring). Subclasses set the class
    attributes and override what differs."""

    name: str = ""  # a label for messages and the report ("swav ResNet", "timm", ...)
    layout: str = ""  # whose key names its exports use ("torchvision ResNet", "timm", ...)
    prefix: str = ""  # "timm/", "torchvision/", "module/"; "" for our ResNets
    extra: str | None = None  # the pip extra with the library (None: the core has it)
    module: str | None = None  # the library's import name
    reads: tuple[str, ...] = ("in_chans", "kwargs")  # the model.* settings it reads
    export_formats: tuple[str, ...] = ("safetensors", "onnx")  # what `swav export --format` can write
    #: a tiny network of the family (``model.arch``, ``model.*`` settings) for tests and examples;
    #: None for the families that build what they are given (registered factories, your module)
    example: tuple[str, dict[str, Any]] | None = None

    # ---- names
    def owns(self, arch: str) -> bool:
        return bool(self.prefix) and arch.startswith(self.prefix)

    def names(self) -> list[str]:
        """The names this family lists (our ResNets); libraries have thousands: ``[]``."""
        return []

    def library_name(self, arch: str) -> str:
        return arch[len(self.prefix):]

    def _missing_library(self, arch: str) -> MissingExtraError | None:
        if self.module is None or is_installed(self.module):
            return None
        return MissingExtraError(f"model.arch = {arch!r}" if arch else f"a backbone named {self.prefix}<name>",
                                 [self.module])

    def missing_extra(self, arch: str = "") -> str | None:
        """One line with the install to run when the family's library is absent, else None."""
        err = self._missing_library(arch)
        return None if err is None else str(err)

    def require(self, arch: str = "") -> None:
        """:class:`swav.extras.MissingExtraError` (exit 2, one line with the pip install) when the
        family's library is not installed."""
        err = self._missing_library(arch)
        if err is not None:
            raise err

    def name_problem(self, arch: str) -> str | None:
        """Why ``arch`` is not a network of this family (e.g. a name timm does not know), or None."""
        return None if self.library_name(arch) else f"model.arch = {arch!r} names no network after {self.prefix!r}"

    # ---- settings
    def setting_problems(self, arch: str, settings: Mapping[str, Any]) -> list[str]:
        """ResNet-only settings at non-default values for a family that does not read them."""
        problems = []
        for key, default in RESNET_SETTINGS.items():
            if key not in self.reads and settings.get(key, default) != default:
                problems.append(f"model.{key} = {settings[key]!r} is a setting of our ResNets; {arch} "
                                f"({self.name}) does not read it: set it back to {default!r} "
                                f"(--set model.{key}={str(default).lower() if isinstance(default, bool) else default})")
        return problems

    def create_kwargs(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of :meth:`create` from the ``model.*`` settings it reads."""
        kw = {k: settings[k] for k in self.reads if k != "kwargs" and k in settings}
        kw.update(settings.get("kwargs") or {})
        return kw

    def create(self, arch: str, **kwargs) -> nn.Module:
        raise NotImplementedError

    def describe(self, arch: str, settings: Mapping[str, Any]) -> list[str]:
        """The network's settings in words, for the report's model row: ``arch (part, part, ...)``."""
        parts = [self.name] + [f"{k}={v!r}" for k, v in (settings.get("kwargs") or {}).items()]
        if settings.get("in_chans", 3) != 3:
            parts.append(f"{settings['in_chans']} input channel(s)")
        return parts

    # ---- weights
    def export_state_dict(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        """The backbone's weights under its library's own key names (classifier removed)."""
        return dict(backbone.state_dict())

    def internal_keys(self, backbone: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file in the library's layout -> the backbone's own key names (inverse of export)."""
        return dict(state_dict)

    def export_name(self, key: str) -> str:
        """A backbone key -> its name in the library's layout (as a file names it)."""
        return key

    def classifier_keys(self, backbone: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """The keys of the library's classifier in a file of its layout (not part of the backbone)."""
        return []

    def load_export_state_dict(self, backbone: nn.Module, state_dict: Mapping[str, torch.Tensor],
                               what: str) -> tuple[list[str], list[str]]:
        """Load a file in the library's layout strictly (every backbone key, with its shape, and no
        other key but the classifier's; an RGB first convolution is adapted to the network's input
        channels, :func:`adapt_input_channels`). Returns ``(the keys not used: the classifier's,
        notes on what was adapted)``."""
        unused = self.classifier_keys(backbone, state_dict)
        body = self.internal_keys(backbone, {k: v for k, v in state_dict.items() if k not in set(unused)})
        adapted = adapt_input_channels(backbone.state_dict(), body)
        check_state_dict(backbone.state_dict(), body, what, rename=self.export_name)
        backbone.load_state_dict(body, strict=True)
        return sorted(unused), [self.export_name(a) for a in adapted]

    def no_weight_decay(self, backbone: nn.Module) -> set[str]:
        """Parameter names (in ``backbone``) the library keeps out of weight decay besides norms and
        biases: timm's ``no_weight_decay()`` (position embeddings, class tokens)."""
        names = getattr(backbone, "no_weight_decay", None)
        return set(names()) if callable(names) else set()

    # ---- distributed training
    def sync_norm_layer(self, layer: nn.Module, device_type: str) -> nn.Module | None:
        """For ``model.sync_bn`` over several processes: a synchronised replacement of one of the
        family's own BatchNorm subclasses (one whose forward computes more than the normalisation,
        such as timm's BatchNormAct2d), on ``device_type`` ("cpu" or a GPU's), that keeps what else
        the layer computes and its state-dict keys; None for a layer the family does not know.
        :func:`swav.distributed.convert_sync_batchnorm` converts torch's own BatchNorms itself, asks
        this for the others and refuses those left."""
        return None

    # ---- inputs
    def min_input_size(self, backbone: nn.Module, in_chans: int, sizes) -> dict[int, tuple[int | None, str]]:
        """Crop sizes the network does not take: ``size -> (smallest that works or None, why)``."""
        return probe_min_size(backbone, in_chans, sizes)


# --------------------------------------------------------------------------------------------
# a user's own module (Python only)
# --------------------------------------------------------------------------------------------
class ModuleFamily(Family):
    """A module the user gives in Python (``swav.trainer.train(cfg, backbone=module)``): it maps
    images to pooled features and says ``num_features``. Its name is ``module/<name>``; a run's
    config names it but cannot rebuild it, so the evaluation and export commands need the module
    again (their Python API takes ``backbone=``), and the command line refuses with a message."""

    name = "your module"
    layout = "your module's"
    prefix = "module/"
    reads = ("in_chans",)

    def __init__(self):
        self._given: dict[str, nn.Module] = {}

    def arch_of(self, module: nn.Module) -> str:
        return self.prefix + type(module).__name__

    @contextlib.contextmanager
    def given(self, arch: str, module: nn.Module) -> Iterator[str]:
        """Within the block, ``create(arch)`` returns a copy of ``module`` as it is now (the network at
        initialisation, each time); the block is the call of train or load_weights that was given it."""
        if not self.owns(arch):
            raise ValueError(f"a module given in Python is named module/<name>, not {arch!r}")
        n = getattr(module, "num_features", None) or getattr(module, "feature_dim", None)
        if not isinstance(module, nn.Module) or not isinstance(n, int) or n < 1:
            raise ValueError(f"backbone= must be an nn.Module that maps images (B, C, H, W) to pooled features "
                             f"(B, num_features) and has an int attribute num_features; got "
                             f"{type(module).__name__} with num_features={n!r}")
        held = self._given.get(arch)
        if held is not None and held is not module:
            raise ValueError(f"another module is already in use as {arch!r} in this process")
        self._given[arch] = module
        try:
            yield arch
        finally:
            if held is None:
                self._given.pop(arch, None)

    def _missing(self, arch: str) -> str:
        return (f"model.arch = {arch!r} is a module that was given in Python; the command line cannot rebuild "
                f"it: give it again, e.g. swav.trainer.train(cfg, backbone=net) to train or resume, "
                f"swav.eval.weights.load_weights(RUN, backbone=net) to evaluate or export")

    def name_problem(self, arch: str) -> str | None:
        return super().name_problem(arch) or (None if arch in self._given else self._missing(arch))

    def create(self, arch: str, **kwargs) -> nn.Module:
        module = self._given.get(arch)
        if module is None:
            raise MissingModuleError(self._missing(arch))
        return copy.deepcopy(module)

    def setting_problems(self, arch, settings):
        problems = super().setting_problems(arch, settings)
        if settings.get("kwargs"):
            problems.append(f"model.kwargs = {settings['kwargs']!r}: {arch} is built by you, not by a library "
                            "constructor; leave model.kwargs empty")
        return problems


class MissingModuleError(ValueError):
    """A run of a user's module, asked to rebuild it without the module (a usage error: exit 2)."""

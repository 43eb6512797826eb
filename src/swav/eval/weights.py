"""The three kinds of weight file the evaluation commands accept, and the export back to them.

=============== =====================================================================================
kind            how it is recognised (keys after removing ``module.`` / ``_orig_mod.`` prefixes)
=============== =====================================================================================
``run``         a dict with ``format: "swav-run/..."``, ``config`` and ``model``: our training state
                (``RUN_DIR/checkpoint.pt``, ``checkpoint-epochN.pt``); loaded with ``load_run_state``.
``official``    a flat state dict with torchvision ResNet keys plus ``projection_head.*`` and
                ``prototypes.*`` (an official SwAV release, RN50 or wide, with or without
                ``module.``); also our own ``SwAVModel.state_dict()`` (keys ``backbone.*``) and
                an official training checkpoint ``{"state_dict": ..., "epoch": ...}``.
``torchvision`` a flat ResNet state dict (``conv1.weight``, ``layer1.0.conv1.weight``, ...; ``fc.*``
                allowed and ignored) without projection head or prototypes.
=============== =====================================================================================

Every file is read with ``torch.load(..., weights_only=True)`` (through
:func:`swav.checkpoint.load_checkpoint_file`, which refuses pickled objects) or with safetensors.
Loading is strict: a missing, unexpected or misshapen key is an error that lists them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from swav import __version__
from swav.atomic import write_bytes_atomic
from swav.checkpoint import (CHECKPOINT_NAME, CheckpointError, StateDictMismatchError, check_state_dict,
                             load_checkpoint_file, load_run_state, model_from_official_state_dict,
                             model_to_official_keys, save_atomic, strip_prefixes)
from swav.models import ResNet, SwAVModel, resnet_kwargs_from_state_dict

__all__ = ["WeightsError", "LoadedWeights", "load_weights", "read_weights_file", "detect_kind",
           "backbone_state_dict", "export_weights", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("torchvision", "safetensors", "official")
_HEAD_PREFIXES = ("projection_head.", "prototypes.")


class WeightsError(ValueError):
    """A file that is none of the accepted kinds, or does not fit the model it describes."""


@dataclass
class LoadedWeights:
    """A weight file loaded into our modules.

    ``model`` is None for a torchvision file (no projection head or prototypes); ``config`` and
    ``run_dir`` are set for run checkpoints only.
    """

    path: Path
    kind: str
    backbone: ResNet
    model: SwAVModel | None = None
    config: Any = None
    run_dir: Path | None = None
    resnet_kwargs: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)  # hidden_mlp, feat_dim, nmb_prototypes of official files
    info: str = ""

    @property
    def has_prototypes(self) -> bool:
        return self.model is not None

    def fresh(self) -> "LoadedWeights":
        """The same architecture at initialisation.

        Run checkpoints: ``torch.manual_seed(cfg.train.seed); build_model(cfg)``, exactly the
        network the run started from. Released files: a new model of the same architecture
        built after ``torch.manual_seed(0)``.
        """
        if self.kind == "run":
            from swav.build import build_model

            torch.manual_seed(self.config.train.seed)
            model = build_model(self.config)
            return LoadedWeights(self.path, self.kind, model.backbone, model, self.config, self.run_dir,
                                 self.resnet_kwargs, self.head, self.info + " at initialisation")
        torch.manual_seed(0)
        kw = dict(self.resnet_kwargs)
        backbone = ResNet(kw.pop("block"), kw.pop("layers"), **kw)
        model = None
        if self.model is not None:
            model = SwAVModel(backbone, **self.head)
        return LoadedWeights(self.path, self.kind, backbone, model, None, None, self.resnet_kwargs, self.head,
                             self.info + " at initialisation (seed 0)")


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    # 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 27)


def read_weights_file(path: str | os.PathLike) -> tuple[Path, Any]:
    """Read a checkpoint without running code from it: ``(resolved path, object)``.

    A folder means ``folder/checkpoint.pt`` (a run folder). ``.safetensors`` files are read with
    safetensors; everything else with ``torch.load(weights_only=True)``, which refuses pickled
    objects with a clear message (:class:`swav.checkpoint.CheckpointError`).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"{path} is a folder without a {CHECKPOINT_NAME}: give a checkpoint file or a run folder")
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return path, load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"safetensors file {path} is unreadable: {e}") from e
    return path, load_checkpoint_file(path)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        shown = ", ".join(map(repr, keys[:12])) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
        kinds = sorted({type(v).__name__ for v in obj.values()})
        return f"a dict of {len(keys)} entries ({', '.join(kinds)}) with keys {shown}"
    return f"a {type(obj).__name__}"


def detect_kind(obj: Any) -> tuple[str, Any]:
    """``(kind, payload)``: ``("run", state)``, ``("official", state_dict)`` or
    ``("torchvision", state_dict)`` (prefix-free for the last two). Raises WeightsError naming what
    was found otherwise."""
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith("swav-run"):
        return "run", obj
    sd = obj
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]  # an official training checkpoint: {"epoch", "state_dict", "optimizer"}
    if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()) \
            and all(isinstance(k, str) for k in sd):
        try:
            flat = strip_prefixes(sd)
        except ValueError as e:
            raise WeightsError(str(e)) from e
        if any(k.startswith("backbone.") for k in flat):  # our SwAVModel's own names
            flat = model_to_official_keys(flat)
        has_resnet = "conv1.weight" in flat and "layer1.0.conv1.weight" in flat
        has_head = any(k.startswith(_HEAD_PREFIXES) for k in flat)
        if has_resnet and has_head:
            return "official", flat
        if has_resnet:
            return "torchvision", flat
    raise WeightsError(
        "not a swav run checkpoint (format/config/model), an official SwAV file (ResNet keys plus "
        "projection_head.* and prototypes.*) nor a torchvision-layout ResNet state dict (conv1.weight, "
        f"layer1.0.conv1.weight, ...): found {_describe(sd)}")


def _fill_num_batches_tracked(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files from old PyTorch versions have no BatchNorm ``num_batches_tracked`` counters; when ALL
    are absent (and only then), add them as 0 next to each ``running_mean``: they are counters, not
    weights, and nothing reads them in eval mode."""
    if any(k.endswith(".num_batches_tracked") for k in sd):
        return sd
    sd = dict(sd)
    for k in [k for k in sd if k.endswith(".running_mean")]:
        sd[k[: -len("running_mean")] + "num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return sd


def _resnet_kwargs(sd: Mapping[str, torch.Tensor], what: str) -> dict:
    try:
        kw = resnet_kwargs_from_state_dict(sd)
    except (ValueError, KeyError, IndexError) as e:
        raise WeightsError(f"{what}: {e}") from e
    kw["num_classes"] = 0
    return kw


def _load_official(path: Path, sd: dict[str, torch.Tensor]) -> LoadedWeights:
    backbone_sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    kw = _resnet_kwargs(backbone_sd, f"{path}: official SwAV file with an unreadable backbone")
    sd = _fill_num_batches_tracked(sd)
    try:
        model = model_from_official_state_dict(sd)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(f"{path}: official SwAV state dict does not fit the architecture its keys "
                                     f"describe ({_arch_name(kw)})", e.missing, e.unexpected, e.shapes) from None
    kw["pool_size"] = model.backbone.pool_size  # read off the head's input width
    proto = model.prototypes
    head = {"hidden_mlp": model.projection_head[0].out_features if len(model.projection_head) > 1 else 0,
            "feat_dim": model.projection_head.out_dim, "nmb_prototypes": proto.nmb_prototypes}
    return LoadedWeights(path, "official", model.backbone, model, None, None, kw, head,
                         f"official SwAV weights ({_arch_name(kw)}, {proto.nmb_prototypes} prototypes)")


def _load_torchvision(path: Path, sd: dict[str, torch.Tensor]) -> LoadedWeights:
    kw = _resnet_kwargs(sd, f"{path}: not a loadable ResNet state dict")
    with torch.device("meta"):  # no time spent initialising weights that are overwritten next
        backbone = ResNet(kw["block"], kw["layers"], **{k: v for k, v in kw.items() if k not in ("block", "layers")})
    body = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items() if not k.startswith("fc.")}
    body = _fill_num_batches_tracked(body)
    check_state_dict(backbone.state_dict(), body, f"{path}: torchvision-layout ResNet state dict does not fit "
                                                  f"the {_arch_name(kw)} its keys describe")
    backbone.load_state_dict(body, strict=True, assign=True)
    return LoadedWeights(path, "torchvision", backbone, None, None, None, kw, {},
                         f"torchvision-layout ResNet weights ({_arch_name(kw)})")


def _load_run(path: Path) -> LoadedWeights:
    from swav.config import from_dict
    from swav.build import build_model

    state = load_run_state(path)
    cfg = from_dict(state["config"])
    model = build_model(cfg)
    check_state_dict(model.state_dict(), state["model"], f"{path}: the run's weights do not fit its own config")
    model.load_state_dict(state["model"], strict=True)
    m = cfg.model
    kw = _resnet_kwargs(model_to_official_keys({k: v for k, v in model.state_dict().items()
                                                if k.startswith("backbone.")}), str(path))
    kw["pool_size"] = cfg.model.pool_size
    head = {"hidden_mlp": m.hidden_mlp, "feat_dim": m.feat_dim, "nmb_prototypes": m.nmb_prototypes}
    step, epochs = int(state["global_step"]), int(state["epochs"])
    return LoadedWeights(path, "run", model.backbone, model, cfg, path.parent, kw, head,
                         f"swav run checkpoint ({m.arch}, step {step}, {epochs} epochs planned)")


def _arch_name(kw: Mapping) -> str:
    block = "Bottleneck" if kw["block"].__name__ == "Bottleneck" else "BasicBlock"
    depth = {("BasicBlock", (1, 1, 1, 1)): "resnet10", ("BasicBlock", (2, 2, 2, 2)): "resnet18",
             ("BasicBlock", (3, 4, 6, 3)): "resnet34",
             ("Bottleneck", (3, 4, 6, 3)): "resnet50", ("Bottleneck", (3, 4, 23, 3)): "resnet101",
             ("Bottleneck", (3, 8, 36, 3)): "resnet152"}.get((block, tuple(kw["layers"])), f"ResNet{kw['layers']}")
    extra = []
    if kw.get("widen", 1) != 1:
        extra.append(f"w{kw['widen']}")
    if kw.get("width_per_group", 64) != 64:
        extra.append(f"width {kw['width_per_group']}")
    if kw.get("in_chans", 3) != 3:
        extra.append(f"{kw['in_chans']} channel(s)")
    if kw.get("small_stem"):
        extra.append("small stem")
    if kw.get("pool_size", 1) > 1:
        extra.append(f"{kw['pool_size']}x{kw['pool_size']} pooled")
    return depth + (f" ({', '.join(extra)})" if extra else "")


def load_weights(path: str | os.PathLike) -> LoadedWeights:
    """Load a run checkpoint, an official SwAV file or a torchvision-layout ResNet state dict.

    Raises :class:`swav.checkpoint.CheckpointError` for unreadable files or files holding pickled
    objects, :class:`WeightsError` for a file of none of the three kinds (naming what was found),
    and :class:`swav.checkpoint.StateDictMismatchError` (listing the keys) for a file whose keys or
    shapes do not fit the architecture it describes.
    """
    path, obj = read_weights_file(path)
    kind, payload = detect_kind(obj)
    if kind == "run":
        del obj, payload
        return _load_run(path)
    if kind == "official":
        return _load_official(path, payload)
    return _load_torchvision(path, payload)


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------

def backbone_state_dict(loaded: LoadedWeights) -> dict[str, torch.Tensor]:
    """The backbone under torchvision's key names (no ``fc``), as independent contiguous tensors."""
    return {k: v.detach().clone().contiguous() for k, v in loaded.backbone.state_dict().items()}


def _official_state_dict(loaded: LoadedWeights, prefix: str = "module.") -> dict[str, torch.Tensor]:
    if loaded.model is None:
        raise WeightsError(f"{loaded.path} holds a backbone only (no projection head or prototypes): "
                           "it cannot be exported in the official layout; use --format torchvision")
    sd = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    return model_to_official_keys(sd, prefix=prefix)


def default_export_path(loaded: LoadedWeights, fmt: str) -> Path:
    stem = loaded.path.stem if loaded.kind != "run" else f"{loaded.path.parent.name}-{loaded.path.stem}"
    ext = ".safetensors" if fmt == "safetensors" else ".pt"
    folder = loaded.run_dir if loaded.run_dir is not None else loaded.path.parent
    return folder / f"{stem}-{fmt}{ext}"


def export_weights(loaded: LoadedWeights, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Write the backbone (``torchvision``: torch.save, ``safetensors``) or the whole model in the
    official layout with ``module.`` prefixes (``official``). Returns the path written.

    A torchvision ResNet of the same architecture loads the first two with ``strict=True`` once its
    ``fc`` is removed (or with the ``fc`` keys reported missing); loading any export again with
    :func:`load_weights` gives identical tensors.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    path = Path(out) if out is not None else default_export_path(loaded, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "official":
        save_atomic(_official_state_dict(loaded), path)
    elif fmt == "torchvision":
        save_atomic(backbone_state_dict(loaded), path)
    else:
        from safetensors.torch import save

        meta = {"format": "pt", "layout": "torchvision-resnet", "source": str(loaded.path),
                "swav_version": __version__, "arch": json.dumps(_arch_name(loaded.resnet_kwargs))}
        write_bytes_atomic(path, save(backbone_state_dict(loaded), metadata=meta))
    return path

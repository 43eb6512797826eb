"""The three kinds of weight file the evaluation commands accept, and the export back to them.

=============== =====================================================================================
kind            how it is recognised (keys after removing ``module.`` / ``_orig_mod.`` prefixes)
=============== =====================================================================================
``run``         a dict with ``format: "swav-run/..."``, ``config`` and ``model``: our training state
                (``RUN_DIR/checkpoint.pt``, ``checkpoint-epochN.pt``) of any backbone family, rebuilt
                from its config through the registry (a timm or torchvision run needs that library;
                a run of a module given in Python needs the module: ``load_weights(path, backbone=)``).
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

Exports ask the backbone's family (``swav.models.family_of``) for its library's key names:
``torchvision`` (our ResNets, torchvision networks), ``timm`` (timm networks), ``safetensors`` (the
same tensors, every family), ``official`` (our ResNets: the whole model in the SwAV release layout)
and ``onnx`` (every family: the backbone as an ONNX graph with a dynamic batch axis).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from swav import __version__
from swav.atomic import write_bytes_atomic
from swav.checkpoint import (StateDictMismatchError, check_state_dict, fill_num_batches_tracked,
                             load_run_state, model_from_official_state_dict, model_to_official_keys,
                             read_weights_file, save_atomic, strip_prefixes)
from swav.extras import MissingExtraError
from swav.models import MODULES, ResNet, SwAVModel, family_of, resnet_kwargs_from_state_dict
from swav.models.resnet import ResNetFamily, resnet_name

__all__ = ["WeightsError", "LoadedWeights", "load_weights", "read_weights_file", "detect_kind",
           "backbone_state_dict", "export_weights", "export_onnx", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("torchvision", "timm", "safetensors", "official", "onnx")
_HEAD_PREFIXES = ("projection_head.", "prototypes.")


class WeightsError(ValueError):
    """A file that is none of the accepted kinds, or does not fit the model it describes."""


@dataclass
class LoadedWeights:
    """A weight file loaded into our modules.

    ``model`` is None for a backbone-only file (no projection head or prototypes); ``config`` and
    ``run_dir`` are set for run checkpoints only; ``module`` is the user's module of a
    ``module/...`` run (needed to rebuild it).
    """

    path: Path
    kind: str
    backbone: torch.nn.Module
    model: SwAVModel | None = None
    config: Any = None
    run_dir: Path | None = None
    resnet_kwargs: dict = field(default_factory=dict)  # released ResNet files: the architecture read off the keys
    head: dict = field(default_factory=dict)  # hidden_mlp, feat_dim, nmb_prototypes of official files
    info: str = ""
    module: torch.nn.Module | None = None

    @property
    def has_prototypes(self) -> bool:
        return self.model is not None

    @property
    def arch(self) -> str:
        return self.config.model.arch if self.config is not None else resnet_name(self.resnet_kwargs)

    @property
    def family(self):
        """The registry's adapter of this backbone (released files are our ResNets, read off their keys)."""
        return family_of(self.config.model.arch) if self.config is not None else ResNetFamily()

    @property
    def in_chans(self) -> int:
        return int(self.config.model.in_chans if self.config is not None else self.resnet_kwargs.get("in_chans", 3))

    def fresh(self) -> "LoadedWeights":
        """The same architecture at initialisation.

        Run checkpoints: ``torch.manual_seed(cfg.train.seed); build_model(cfg)``, exactly the
        network the run started from. Released files: a new model of the same architecture
        built after ``torch.manual_seed(0)``.
        """
        if self.kind == "run":
            from swav.build import build_model

            torch.manual_seed(self.config.train.seed)
            with _given(self.config, self.module):
                model = build_model(self.config)
            return LoadedWeights(self.path, self.kind, model.backbone, model, self.config, self.run_dir,
                                 self.resnet_kwargs, self.head, self.info + " at initialisation", self.module)
        torch.manual_seed(0)
        kw = dict(self.resnet_kwargs)
        backbone = ResNet(kw.pop("block"), kw.pop("layers"), **kw)
        model = None
        if self.model is not None:
            model = SwAVModel(backbone, **self.head)
        return LoadedWeights(self.path, self.kind, backbone, model, None, None, self.resnet_kwargs, self.head,
                             self.info + " at initialisation (seed 0)")


def _given(cfg, module):
    """The registry's view of a module given in Python, for rebuilding a ``module/...`` run."""
    if module is None:
        return contextlib.nullcontext()
    return MODULES.given(cfg.model.arch, module)


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------

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
        f"layer1.0.conv1.weight, ...): found {_describe(sd)}; a timm or torchvision backbone's export "
        "does not say how to rebuild its network: give the run folder it came from")


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
    sd = fill_num_batches_tracked(sd)
    try:
        model = model_from_official_state_dict(sd)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(f"{path}: official SwAV state dict does not fit the architecture its keys "
                                     f"describe ({resnet_name(kw)})", e.missing, e.unexpected, e.shapes) from None
    kw["pool_size"] = model.backbone.pool_size  # read off the head's input width
    proto = model.prototypes
    head = {"hidden_mlp": model.projection_head[0].out_features if len(model.projection_head) > 1 else 0,
            "feat_dim": model.projection_head.out_dim, "nmb_prototypes": proto.nmb_prototypes}
    return LoadedWeights(path, "official", model.backbone, model, None, None, kw, head,
                         f"official SwAV weights ({resnet_name(kw)}, {proto.nmb_prototypes} prototypes)")


def _load_torchvision(path: Path, sd: dict[str, torch.Tensor]) -> LoadedWeights:
    kw = _resnet_kwargs(sd, f"{path}: not a loadable ResNet state dict")
    with torch.device("meta"):  # no time spent initialising weights that are overwritten next
        backbone = ResNet(kw["block"], kw["layers"], **{k: v for k, v in kw.items() if k not in ("block", "layers")})
    body = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items() if not k.startswith("fc.")}
    body = fill_num_batches_tracked(body)
    check_state_dict(backbone.state_dict(), body, f"{path}: torchvision-layout ResNet state dict does not fit "
                                                  f"the {resnet_name(kw)} its keys describe")
    backbone.load_state_dict(body, strict=True, assign=True)
    return LoadedWeights(path, "torchvision", backbone, None, None, None, kw, {},
                         f"torchvision-layout ResNet weights ({resnet_name(kw)})")


def _load_run(path: Path, module: torch.nn.Module | None) -> LoadedWeights:
    from swav.build import build_model
    from swav.config import from_dict

    state = load_run_state(path)
    cfg = from_dict(state["config"])
    m = cfg.model
    family_of(m.arch).require(m.arch)  # a timm run without timm: one line with the pip install
    with _given(cfg, module):
        model = build_model(cfg)
    check_state_dict(model.state_dict(), state["model"], f"{path}: the run's weights do not fit its own config")
    model.load_state_dict(state["model"], strict=True)
    head = {"hidden_mlp": m.hidden_mlp, "feat_dim": m.feat_dim, "nmb_prototypes": m.nmb_prototypes}
    step, epochs = int(state["global_step"]), int(state["epochs"])
    return LoadedWeights(path, "run", model.backbone, model, cfg, path.parent, {}, head,
                         f"swav run checkpoint ({m.arch}, step {step}, {epochs} epochs planned)", module)


def load_weights(path: str | os.PathLike, *, backbone: torch.nn.Module | None = None) -> LoadedWeights:
    """Load a run checkpoint, an official SwAV file or a torchvision-layout ResNet state dict.

    ``backbone``: for a run that trained a module given in Python (``model.arch = module/...``),
    the module again: its architecture gets the run's weights, and as it is it serves as the
    network at initialisation (``fresh()``, ``--compare-init``): give the object the run started from.

    Raises :class:`swav.checkpoint.CheckpointError` for unreadable files or files holding pickled
    objects, :class:`WeightsError` for a file of none of the three kinds (naming what was found),
    :class:`swav.checkpoint.StateDictMismatchError` (listing the keys) for a file whose keys or
    shapes do not fit the architecture it describes, and :class:`swav.models.MissingExtraError`
    for a run whose backbone library is not installed.
    """
    path, obj = read_weights_file(path)
    kind, payload = detect_kind(obj)
    if kind == "run":
        del obj, payload
        return _load_run(path, backbone)
    if kind == "official":
        return _load_official(path, payload)
    return _load_torchvision(path, payload)


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------

def backbone_state_dict(loaded: LoadedWeights) -> dict[str, torch.Tensor]:
    """The backbone under its library's key names (torchvision's for our ResNets and torchvision
    networks, timm's for timm networks; no classifier), as independent contiguous tensors."""
    sd = loaded.family.export_state_dict(loaded.backbone)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _official_state_dict(loaded: LoadedWeights, prefix: str = "module.") -> dict[str, torch.Tensor]:
    if loaded.model is None:
        raise WeightsError(f"{loaded.path} holds a backbone only (no projection head or prototypes): "
                           "it cannot be exported in the official layout; use --format torchvision")
    sd = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    return model_to_official_keys(sd, prefix=prefix)


def default_export_path(loaded: LoadedWeights, fmt: str) -> Path:
    stem = loaded.path.stem if loaded.kind != "run" else f"{loaded.path.parent.name}-{loaded.path.stem}"
    ext = {"safetensors": ".safetensors", "onnx": ".onnx"}.get(fmt, ".pt")
    folder = loaded.run_dir if loaded.run_dir is not None else loaded.path.parent
    return folder / f"{stem}-{fmt}{ext}"


def export_metadata(loaded: LoadedWeights) -> dict[str, str]:
    """What a user of an export needs to rebuild the network (strings: safetensors and ONNX metadata)."""
    meta = {"source": str(loaded.path), "swav_version": __version__, "arch": loaded.arch,
            "family": loaded.family.name, "in_chans": str(loaded.in_chans)}
    cfg = loaded.config
    if cfg is not None:
        meta["model_kwargs"] = json.dumps(cfg.model.kwargs, sort_keys=True)
        meta["mean"], meta["std"] = json.dumps(list(cfg.augment.mean)), json.dumps(list(cfg.augment.std))
    classifier = getattr(loaded.backbone, "classifier", "")
    if classifier:
        meta["removed_classifier"] = classifier  # replace it by torch.nn.Identity() in the library's model
    pool = loaded.config.model.pool_size if cfg is not None else loaded.resnet_kwargs.get("pool_size", 1)
    if pool != 1:
        meta["pool_size"] = str(pool)
    return meta


def export_weights(loaded: LoadedWeights, fmt: str, out: str | os.PathLike | None = None,
                   size: int | None = None) -> Path:
    """Write the backbone in its library's layout (``torchvision`` / ``timm``: torch.save;
    ``safetensors``), the whole model in the official layout with ``module.`` prefixes (``official``,
    our ResNets), or the backbone as ONNX (``onnx``, input ``size`` px: default the run's large crops,
    else 224). Returns the path written. A format the backbone's family has no layout for is a
    WeightsError naming the ones it has.

    The library's own model loads the first three with ``strict=True`` once its classifier is
    removed (see :func:`swav.models.library.remove_classifier`; timm: ``num_classes=0``); loading
    a ResNet export again with :func:`load_weights` gives identical tensors.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    family = loaded.family
    if fmt not in family.export_formats:
        raise WeightsError(f"{loaded.arch} ({family.name}) cannot be exported as {fmt!r}: its formats are "
                           f"{', '.join(family.export_formats)}")
    path = Path(out) if out is not None else default_export_path(loaded, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "official":
        save_atomic(_official_state_dict(loaded), path)
    elif fmt == "onnx":
        export_onnx(loaded, path, size)
    elif fmt == "safetensors":
        from safetensors.torch import save

        meta = {"format": "pt", "layout": family.layout, **export_metadata(loaded)}
        write_bytes_atomic(path, save(backbone_state_dict(loaded), metadata=meta))
    else:
        save_atomic(backbone_state_dict(loaded), path)
    return path


def export_onnx(loaded: LoadedWeights, path: str | os.PathLike, size: int | None = None) -> Path:
    """The backbone (eval mode, float32, CPU) as an ONNX graph: input ``images`` (N, C, size, size),
    already normalised as in training; output ``features`` (N, num_features); N is dynamic. Written
    through torch.onnx (dynamo) with onnxscript; the export metadata (arch, mean, std, ...) goes into
    the model's metadata_props. Needs ``pip install 'swav[onnx]'``."""
    from swav.extras import is_installed

    missing = [m for m in ("onnx", "onnxscript") if not is_installed(m)]
    if missing:
        raise MissingExtraError("--format onnx", missing)
    import onnx

    if size is None:
        size = int(loaded.config.augment.size_crops[0]) if loaded.config is not None else 224
    path = Path(path)
    net = copy.deepcopy(loaded.backbone).float().cpu().eval()
    x = torch.zeros(2, loaded.in_chans, size, size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.onnx.export(net, (x,), str(tmp), input_names=["images"], output_names=["features"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
                          external_data=False, verify=False, report=False, verbose=False)
        graph = onnx.load(str(tmp))
        meta = {**export_metadata(loaded), "input_size": str(size)}
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=value)
        write_bytes_atomic(path, graph.SerializeToString())
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path

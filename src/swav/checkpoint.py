"""State dicts in the official SwAV layout: strict import into our model, export back.

Official files are flat state dicts: torchvision ResNet keys at the top level, plus
``projection_head.{0,1,3}.*`` and ``prototypes.weight`` (or ``prototypes.prototypes{i}.weight``),
usually with a ``module.`` prefix from DistributedDataParallel. Our ``SwAVModel`` keeps the
backbone under ``backbone.``. Loading is strict: a missing, unexpected or misshapen key is an
error that lists them.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import stat
import warnings
from pathlib import Path
from typing import Mapping

import torch

from swav.atomic import fsync_dir

from swav.models import SwAVModel, resnet_kwargs_from_state_dict
from swav.models.families import StateDictMismatchError, check_state_dict
from swav.models.resnet import ResNet

__all__ = [
    "StateDictMismatchError", "check_state_dict", "strip_prefixes", "official_to_model_keys",
    "model_to_official_keys", "load_official_state_dict", "model_from_official_state_dict",
    "read_weights_file", "load_backbone_weights", "InitReport",
]

KNOWN_PREFIXES = ("module.", "_orig_mod.")
_HEAD_PREFIXES = ("projection_head.", "prototypes.")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=KNOWN_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile), repeatedly."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        if key in out:
            raise ValueError(f"key {key!r} appears twice once prefixes {prefixes} are removed")
        out[key] = value
    return out


def official_to_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official (prefix-free) names -> our SwAVModel names (backbone under ``backbone.``)."""
    return {(k if k.startswith(_HEAD_PREFIXES) else "backbone." + k): v for k, v in state_dict.items()}


def model_to_official_keys(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our SwAVModel names -> official names (``prefix="module."`` reproduces released files)."""
    out = {}
    for k, v in state_dict.items():
        name = k[len("backbone."):] if k.startswith("backbone.") else k
        out[prefix + name] = v
    return out


def _official_name(key: str) -> str:
    return key[len("backbone."):] if key.startswith("backbone.") else key


def load_official_state_dict(model: SwAVModel, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an official-layout state dict (with or without ``module.``) into ``model``, strictly."""
    mapped = official_to_model_keys(strip_prefixes(state_dict))
    check_state_dict(model.state_dict(), mapped, "official state dict does not fit this model", _official_name)
    model.load_state_dict(mapped, strict=True)


def _pool_size_of(sd: Mapping[str, torch.Tensor], channels: int) -> int:
    """The backbone's pooling grid side, read off the projection head's input width: the head takes
    ``channels * pool_size**2`` features (1 for the official models, 4 for the fashion-mnist preset).
    A width that is no such multiple gives 1, and the strict load then reports the mismatch."""
    head = sd.get("projection_head.0.weight")
    if head is None or head.ndim != 2 or head.shape[1] <= channels:
        return 1
    side = int(round((head.shape[1] / channels) ** 0.5))
    return side if head.shape[1] == channels * side * side else 1


def model_from_official_state_dict(state_dict: Mapping[str, torch.Tensor], *, normalize: bool = True) -> SwAVModel:
    """Build a SwAVModel whose architecture is read off an official state dict, and load it strictly."""
    sd = strip_prefixes(state_dict)
    backbone_sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    kw = resnet_kwargs_from_state_dict(backbone_sd)
    block, layers = kw.pop("block"), kw.pop("layers")
    backbone = ResNet(block, layers, **kw)
    pool = _pool_size_of(sd, backbone.num_features)
    if pool != 1:
        backbone = ResNet(block, layers, **kw, pool_size=pool)
    if "projection_head.3.weight" in sd:
        hidden, feat = sd["projection_head.0.weight"].shape[0], sd["projection_head.3.weight"].shape[0]
    elif "projection_head.0.weight" in sd:
        hidden, feat = 0, sd["projection_head.0.weight"].shape[0]
    else:
        raise StateDictMismatchError("official state dict has no projection head", missing=["projection_head.0.weight"])
    if "prototypes.weight" in sd:
        nmb = int(sd["prototypes.weight"].shape[0])
    else:
        heads = sorted(int(k.split(".")[1][len("prototypes"):]) for k in sd
                       if k.startswith("prototypes.prototypes") and k.endswith(".weight"))
        if not heads:
            raise StateDictMismatchError("official state dict has no prototypes", missing=["prototypes.weight"])
        nmb = [int(sd[f"prototypes.prototypes{i}.weight"].shape[0]) for i in range(len(heads))]
    model = SwAVModel(backbone, hidden_mlp=hidden, feat_dim=feat, nmb_prototypes=nmb, normalize=normalize)
    load_official_state_dict(model, sd)
    return model



# --------------------------------------------------------------------------------------
# Run state files: one file, written atomically, read without running code
# --------------------------------------------------------------------------------------

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


class _RecordingWriter:
    """A file's ``write`` that remembers the OSError it raised: torch.save turns a failed write
    (ENOSPC, EFBIG, EIO) into a RuntimeError that no longer says which error it was."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` is always either the old or the new file.

    Writes a temporary file in the same folder, fsyncs it, renames it over ``path`` and fsyncs the
    folder. On failure (a full disk, a file-size limit, an interrupt) the temporary file is removed
    and the previous file is left intact; a failed write raises OSError with the original errno and
    a message that names the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        err = e if isinstance(e, OSError) else (writer.error if writer is not None else None)
        if err is None:
            raise
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"could not write checkpoint {path} ({reason}); the previous "
                                 f"checkpoint there, if any, is intact") from e
    fsync_dir(path.parent)


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` a second name (hard link) of the complete file ``src``, atomically: ``dst`` is
    always either its previous file or ``src``. Raises OSError where the file system has no hard
    links (the caller then writes the file again)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dst.parent)


def _unpickling_refusal(path: Path, e: Exception) -> CheckpointError:
    """The reason the restricted unpickler gave up, in one line: code it would have had to import
    and call, or a stream that is not a checkpoint at all."""
    text = str(e)
    found = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", text)
    if found:
        return CheckpointError(
            f"refused {path}: loading it would import and call {found.group(1)}, i.e. run code stored in "
            "the file; only tensors and plain containers are loaded (torch.load weights_only=True). "
            "Do not load this file with weights_only=False unless you made it yourself")
    detail = next((line.strip() for line in text.splitlines()
                   if line.strip().startswith(("Unsupported operand", "Unsupported", "Expected", "Unpickler"))),
                  text.strip().splitlines()[-1] if text.strip() else type(e).__name__)
    return CheckpointError(f"{path} is not a PyTorch checkpoint that can be loaded safely (corrupt, truncated or "
                           f"another format): {detail}")


def load_checkpoint_file(path: str | os.PathLike, max_bytes: int = 1 << 36):
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never code.

    Every failure is a :class:`CheckpointError` naming the file and the reason: missing, not a
    regular file, empty, over ``max_bytes``, truncated or corrupt, or holding pickled objects
    whose rebuilding would call code.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if st.st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if st.st_size > max_bytes:
        raise CheckpointError(f"checkpoint {path} is {st.st_size} bytes, over the {max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_refusal(path, e) from e
    except MemoryError as e:
        raise CheckpointError(f"checkpoint {path}: out of memory while loading it") from e
    except Exception as e:  # truncated zip, bad magic number, KeyError from a garbled stream, ...
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint that can be loaded (unreadable, "
                              f"truncated or corrupt): "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def load_run_state(path: str | os.PathLike, max_bytes: int = 1 << 36) -> dict:
    """A run's training state (see trainer.py), checked for the fields resuming needs."""
    state = load_checkpoint_file(path, max_bytes=max_bytes)
    needed = ("format", "config", "epochs", "global_step", "model", "optimizer")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        have = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a swav run checkpoint (needs {list(needed)}, found {have})")
    return state


# --------------------------------------------------------------------------------------
# Weight files of any kind, read without running code; a backbone started from one (--init-from)
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


def read_weights_file(path: str | os.PathLike) -> tuple[Path, object]:
    """Read a checkpoint without running code from it: ``(resolved path, object)``.

    A folder means ``folder/checkpoint.pt`` (a run folder). ``.safetensors`` files are read with
    safetensors; everything else with ``torch.load(weights_only=True)``, which refuses pickled
    objects with a clear message (:class:`CheckpointError`).
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


def fill_num_batches_tracked(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files from old PyTorch versions have no BatchNorm ``num_batches_tracked`` counters; when ALL
    are absent (and only then), add them as 0 next to each ``running_mean``: they are counters, not
    weights, and nothing reads them in eval mode."""
    sd = dict(sd)
    if any(k.endswith(".num_batches_tracked") for k in sd):
        return sd
    for k in [k for k in sd if k.endswith(".running_mean")]:
        sd[k[: -len("running_mean")] + "num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return sd


def _tensor_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict inside a file: itself, a swav run's ``model``, or the ``state_dict`` /
    ``model`` entry of a training checkpoint (official SwAV, timm's train.py, DeiT)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith("swav-run"):
        obj = obj.get("model")
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), Mapping) and not isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
    if not (isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in obj.items())):
        raise CheckpointError(f"{path} holds no state dict of tensors (found {type(obj).__name__}"
                              f"{' with keys ' + ', '.join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else ''})")
    return strip_prefixes(obj)


class InitReport:
    """What ``--init-from`` loaded: the file, its layout, how many tensors, and every key not used."""

    def __init__(self, path: Path, layout: str, loaded: int, unused: list[str], adapted: list[str] = ()):
        self.path, self.layout, self.loaded, self.unused = path, layout, loaded, list(unused)
        self.adapted = list(adapted)

    def line(self) -> str:
        shown = ", ".join(self.unused[:20]) + (f", ... ({len(self.unused) - 20} more)" if len(self.unused) > 20 else "")
        return (f"backbone initialised from {self.path} ({self.layout}): {self.loaded} tensors, every backbone key; "
                + (f"{len(self.unused)} key(s) of the file not used: {shown}" if self.unused else
                   "every key of the file used") + "".join(f"; {a}" for a in self.adapted))


def load_backbone_weights(backbone: torch.nn.Module, family, path: str | os.PathLike, arch: str) -> InitReport:
    """Load a weight file into ``backbone`` (of ``family``, the registry's adapter for ``arch``), strictly.

    Accepted: a swav run (folder or checkpoint) or a SwAVModel state dict (keys ``backbone.*``), an
    official SwAV file (ResNet keys at the top, plus the head), or a state dict in the backbone
    library's own layout (torchvision's ResNet keys for ours, timm's or torchvision's for theirs,
    as ``swav export`` writes them). Every backbone key must be in the file with its shape
    (StateDictMismatchError names the missing, unexpected and misshapen ones); the keys that are not
    the backbone's (a projection head, prototypes, a library classifier) are not used and named in
    the returned report.
    """
    path, obj = read_weights_file(path)
    sd = _tensor_dict(obj, path)
    what = f"--init-from {path}: its weights do not fit {arch}"
    if any(k.startswith("backbone.") for k in sd):
        body = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        unused = sorted(k for k in sd if not k.startswith("backbone."))
        check_state_dict(backbone.state_dict(), body, what)
        backbone.load_state_dict(body, strict=True)
        return InitReport(path, "a swav model", len(body), unused)
    head = sorted(k for k in sd if k.startswith(_HEAD_PREFIXES))
    body = fill_num_batches_tracked({k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)})
    classifier, adapted = family.load_export_state_dict(backbone, body, what)
    layout = "an official SwAV file" if head else f"a {family.name} state dict"
    return InitReport(path, layout, len(body) - len(classifier), head + classifier, adapted)

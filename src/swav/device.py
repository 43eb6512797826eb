"""The one place that resolves a run's device, its precision and the autocast that goes with it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from swav.config import ConfigError

__all__ = ["device_type_of", "pick_device", "resolve_device", "resolve_precision", "check_precision",
           "autocast", "synchronize", "cpu_name", "device_name", "resolve_channels_last", "resolve_compile",
           "configure_backends"]


def device_type_of(spec: str) -> str:
    """``"cuda"`` or ``"cpu"``: the kind of device ``train.device = spec`` asks for, before any
    process group exists (the group's backend depends on it). Raises ConfigError for CUDA without a GPU."""
    kind = "cuda" if (spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())) else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {spec!r} but no CUDA GPU is visible; use --device cpu")
    return kind


def pick_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The device of ``train.device = spec`` for this process; ``local_rank`` (in a process group)
    picks the GPU of plain ``cuda``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {spec!r} but no CUDA GPU is visible; use --device cpu")
        if spec == "cuda":
            return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    return torch.device(spec)


def resolve_device(spec: str | None) -> torch.device:
    """A ``--device`` option of the evaluation and report commands (None or ``auto``: a GPU when visible)."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "fp32"
        return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"
    return "fp32"


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ConfigError when ``precision`` (resolved) cannot run on ``device``."""
    if precision == "fp16" and device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
        raise ConfigError([f"train.precision = fp16 off a CUDA GPU needs torch >= 2.3 (a CPU GradScaler; this is "
                           f"{torch.__version__}); use bf16 or fp32"])


def resolve_channels_last(setting: bool | str, device: torch.device, precision: str) -> bool:
    """``train.channels_last``: ``auto`` -> on for bf16/fp16 (cuDNN's tensor-core convolutions and
    oneDNN's bf16 ones work in NHWC; NCHW inputs are transposed around every convolution), off for
    fp32. Not measured here on a GPU: bench/gpu_check.py times both."""
    if setting == "auto":
        return precision in ("bf16", "fp16")
    return bool(setting)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: ``auto`` -> on a CUDA device where Triton (torch.compile's GPU code
    generator) is installed and supports the GPU, off elsewhere (on a CPU compiling costs minutes
    for a step that oneDNN already runs well). Not measured here on a GPU: bench/gpu_check.py
    times both."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton  # torch.compile's own check: Triton and a GPU it supports

    return has_triton()


def configure_backends(device: torch.device) -> None:
    """Backend settings of a training process on ``device``: cuDNN picks the fastest convolution
    algorithm for each shape it meets (``cudnn.benchmark``; the crops come in a few fixed shapes)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast for a resolved precision (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    import platform

    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its logical CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"

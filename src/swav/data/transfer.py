"""Batches handed to the training device without making it wait.

On a CUDA device, :class:`DeviceFeeder` copies the images of the *next* batch while the current
step computes: from page-locked memory (the loader pins its batches), with ``non_blocking`` copies
on a side stream, and the step's stream waits for that copy only (an event, not the host). A copy
from pageable memory would make the host wait for the whole queue of the device (the driver stages
such copies synchronously), and a copy on the step's own stream would queue behind the step.

The images go to the device; ``sizes``, ``labels`` and ``indices`` stay on the host, where the
step plans its crops from them (:meth:`swav.data.multicrop.MultiCrop.forward`) without reading
anything back from the device. Elsewhere (CPU) the batches pass through unchanged.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator

import torch

from swav.data.batch import Batch, pinned

__all__ = ["DeviceFeeder", "pinned", "to_device"]


def to_device(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Host tensors on ``device`` without making the host wait: on CUDA from page-locked memory with
    ``non_blocking`` copies (a copy from pageable memory waits for the device's queue)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    return {k: pinned(v).to(device, non_blocking=True) for k, v in tensors.items()}


class DeviceFeeder:
    """Iterate over ``batches`` with each batch's images on ``device``, the next batch's copy
    under way while the current one is used (CUDA); see the module docstring."""

    def __init__(self, batches: Iterable[Batch], device: torch.device):
        self.batches = batches
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            for batch in self.batches:
                yield replace(batch, images=batch.images.to(self.device))
            return
        yield from self._cuda()

    def _cuda(self) -> Iterator[Batch]:
        stream = torch.cuda.Stream(self.device)
        it = iter(self.batches)
        ahead = self._send(next(it, None), stream)
        while ahead is not None:
            batch, ready = ahead
            ahead = self._send(next(it, None), stream)  # the next copy starts before this step runs
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            batch.images.record_stream(current)  # its memory is in use by the step's stream too
            yield batch

    def _send(self, batch: Batch | None, stream) -> tuple[Batch, object] | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            images = pinned(batch.images).to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return replace(batch, images=images), ready

"""What every data set and the loader hand around: a :class:`Batch` and a :class:`Skipped` record.

A leaf module: it imports no other module of :mod:`swav.data`, so the data sets
(:mod:`swav.data.memory`, :mod:`swav.data.datasets`) and the loader
(:mod:`swav.data.loader`) can all use it without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

__all__ = ["Batch", "Skipped", "pinned"]


def pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked memory, for a copy to a GPU that does not block: as it is when it is
    there already, else a copy in the same memory layout (channels-last batches stay so)."""
    if t.is_pinned():
        return t
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).pin_memory().permute(0, 3, 1, 2)
    return t.pin_memory()


@dataclass(frozen=True)
class Skipped:
    """A file that was not used: its path, why, and its dataset index."""

    path: str
    reason: str
    index: int = -1


@dataclass
class Batch:
    """A batch of images.

    images:  uint8 ``(N, C, H, W)``, zero-padded (bottom/right) to the largest
             H and W in the batch (from image files: in channels-last memory, as decoded);
    sizes:   int64 ``(N, 2)``, each image's true ``(h, w)`` before padding;
    labels:  int64 ``(N,)``, ``-1`` = unknown;
    indices: int64 ``(N,)``, dataset indices;
    skipped: :class:`Skipped` records of the files of this batch that could
             not be used (they are not among the N images).
    """

    images: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors (for fast non-blocking copies to a GPU)."""
        return replace(
            self,
            images=pinned(self.images),
            sizes=self.sizes.pin_memory(),
            labels=self.labels.pin_memory(),
            indices=self.indices.pin_memory(),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            sizes=self.sizes.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            indices=self.indices.to(device, non_blocking=non_blocking),
        )

"""The in-memory data set: a whole data set as one uint8 tensor ``(N, C, H, W)``.

:class:`TensorImageDataset` is what the built-in data sets of
:mod:`swav.data.builtin` load into; a batch is one ``index_select``
(:meth:`TensorImageDataset.get_batch`).  It imports only
:mod:`swav.data.batch`, so :mod:`swav.data.builtin` can build one without
importing :mod:`swav.data.datasets` (which dispatches to the built-ins).
"""

from __future__ import annotations

import torch

from swav.data.batch import Batch

__all__ = ["TensorImageDataset", "to_channels"]


# --------------------------------------------------------------------------- #
# Channel conversion of uint8 tensors
# --------------------------------------------------------------------------- #
def to_channels(images: torch.Tensor, in_chans: int | None) -> torch.Tensor:
    """Convert uint8 images ``(N, C, H, W)`` to ``in_chans`` channels.

    1 -> 3 repeats the grey channel (as a stride-0 view, no copy);
    3 -> 1 is the ITU-R 601-2 luma ``(299 R + 587 G + 114 B) / 1000``, rounded
    like Pillow's ``convert("L")``.
    """
    if in_chans is None:
        return images
    c = images.shape[1]
    if c == in_chans:
        return images
    if c == 1 and in_chans == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and in_chans == 1:
        out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
        step = 4096
        for s in range(0, images.shape[0], step):
            chunk = images[s : s + step].to(torch.int32)
            out[s : s + step] = ((chunk * w).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)
        return out
    raise ValueError(f"cannot convert {c}-channel images to {in_chans} channels (supported: 1 or 3)")


# --------------------------------------------------------------------------- #
# In-memory dataset
# --------------------------------------------------------------------------- #
class TensorImageDataset:
    """A data set held in memory as one uint8 tensor ``(N, C, H, W)``.

    ``images`` may be a non-contiguous view (e.g. a memory map or a channel
    ``expand``); :meth:`get_batch` copies only the rows it selects.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        classes: list[str] | None = None,
        name: str = "tensor",
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"{name}: images must be a uint8 tensor (N, C, H, W)")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"{name}: labels shape {tuple(labels.shape)} != ({images.shape[0]},)")
        self.images = images
        self.labels = labels
        self.classes = list(classes) if classes is not None else None
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_memory(self) -> bool:
        """True: every image is in memory, all of one size, and :meth:`get_batch` gathers a batch
        (the image files of :class:`~swav.data.datasets.ImageFilesDataset` say False)."""
        return True

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    def __getitem__(self, i: int):
        label = int(self.labels[i]) if self.labels is not None else -1
        return self.images[i].contiguous(), label, int(i)

    def get_batch(self, indices: torch.Tensor) -> Batch:
        """Gather a :class:`~swav.data.batch.Batch` (vectorised, no per-sample loop)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        images = self.images.index_select(0, idx).contiguous()
        n = idx.numel()
        h, w = self.images.shape[2], self.images.shape[3]
        sizes = torch.empty((n, 2), dtype=torch.int64)
        sizes[:, 0], sizes[:, 1] = h, w
        if self.labels is not None:
            labels = self.labels.index_select(0, idx)
        else:
            labels = torch.full((n,), -1, dtype=torch.int64)
        return Batch(images=images, sizes=sizes, labels=labels, indices=idx.clone(), skipped=[])

    def subset(self, n: int) -> "TensorImageDataset":
        """The first ``n`` images (all of them when ``n <= 0`` or ``n >= len``)."""
        if n <= 0 or n >= len(self):
            return self
        labels = self.labels[:n] if self.labels is not None else None
        return TensorImageDataset(self.images[:n], labels, self.classes, self.name)

    def with_channels(self, in_chans: int | None) -> "TensorImageDataset":
        if in_chans is None or in_chans == self.in_chans:
            return self
        return TensorImageDataset(to_channels(self.images, in_chans), self.labels, self.classes, self.name)

    def __repr__(self) -> str:
        return f"TensorImageDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"

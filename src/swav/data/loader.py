"""Batches, deterministic epoch order and the sharded epoch loader.

Sharding rule (1-process and N-process runs see the same data): the epoch's
global permutation :func:`epoch_indices` is cut into global batches of
``global_batch_size`` and rank ``r`` takes elements ``[r*b, (r+1)*b)`` of each
global batch, ``b = global_batch_size // world_size``.  Concatenating the
ranks' batches of a step in rank order gives the 1-process batch of that step.

:class:`~swav.data.batch.Batch` is defined in :mod:`swav.data.batch` and
re-exported here (``from swav.data.loader import Batch`` keeps working).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import signal
import threading
from typing import Iterator, Sequence

import torch

from swav.data.batch import Batch, Skipped
from swav.data.datasets import EmptyDatasetError, ImageFilesDataset
from swav.data.memory import TensorImageDataset

__all__ = ["Batch", "EpochLoader", "epoch_indices", "pad_collate"]


def _empty_batch(channels: int, skipped: list[Skipped] | None = None) -> Batch:
    return Batch(
        images=torch.zeros((0, channels, 0, 0), dtype=torch.uint8),
        sizes=torch.zeros((0, 2), dtype=torch.int64),
        labels=torch.zeros((0,), dtype=torch.int64),
        indices=torch.zeros((0,), dtype=torch.int64),
        skipped=list(skipped or []),
    )


def pad_collate(items: Sequence, channels: int | None = None) -> Batch:
    """Collate ``(image CxHxW, label, index)`` items and :class:`Skipped`
    records into a :class:`Batch`, zero-padding images to the largest H, W.

    The images come at their decode size (:func:`swav.data.datasets.decode_image`), so the batch
    is bounded by it, whatever the photos' own sizes. The batch is ``(N, C, H, W)`` in
    channels-last memory, as the decoder writes pixels: each image (a (C, H, W) view of the
    decoder's (H, W, C) memory) is copied once, row by row, with no transposition (that would cost
    ten times the copy), and only the padding is zeroed. ``channels`` is only used for the shape
    of a batch whose items were all skipped (default 3).
    """
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if not good:
        return _empty_batch(channels or 3, skipped)
    chans = {int(img.shape[0]) for img, _, _ in good}
    if len(chans) != 1:
        raise ValueError(f"images with different channel counts in one batch: {sorted(chans)}")
    c = chans.pop()
    hw = [(int(img.shape[1]), int(img.shape[2])) for img, _, _ in good]
    hmax, wmax = max(h for h, _ in hw), max(w for _, w in hw)
    canvas = torch.empty((len(good), hmax, wmax, c), dtype=torch.uint8)  # (N, H, W, C): rows copied whole
    for k, ((img, _, _), (h, w)) in enumerate(zip(good, hw)):
        canvas[k, :h, :w] = img.permute(1, 2, 0)
        canvas[k, h:] = 0
        canvas[k, :h, w:] = 0
    images = canvas.permute(0, 3, 1, 2)  # (N, C, H, W) in channels-last memory
    sizes = torch.as_tensor(hw, dtype=torch.int64)
    labels = torch.as_tensor([int(lab) for _, lab, _ in good], dtype=torch.int64)
    indices = torch.as_tensor([int(i) for _, _, i in good], dtype=torch.int64)
    return Batch(images=images, sizes=sizes, labels=labels, indices=indices, skipped=skipped)


def _worker_init(worker_id: int) -> None:
    """In a data-loader worker: SIGTERM and SIGUSR1 from anyone but the parent are ignored.

    SLURM (pre-emption, time limit) and ``kill -- -PGID`` signal every process of the job, the
    workers included. A worker killed by SIGTERM makes the main process fail at once ("DataLoader
    worker is killed by signal"), before it can finish its step and write its checkpoint. So the
    worker blocks SIGTERM and a thread takes it with ``sigwaitinfo``: sent by the parent (the
    loader's own shutdown) or after the parent has gone, the worker exits at once, as torch's
    handler does; from anyone else it is ignored, and the main process, which handles the signal,
    stops the workers when it is done.
    """
    if not (hasattr(signal, "SIGUSR1") and hasattr(signal, "sigwaitinfo")):  # Windows, macOS: as torch does
        return
    parent = os.getppid()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by threads started later

    def take_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="swav-worker-sigterm", daemon=True).start()


def _mix_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"swav-epoch:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_indices(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch``: ``torch.randperm(n)`` from a CPU generator
    seeded by a hash of ``(seed, epoch)`` (identical in every process), or
    ``arange(n)`` when ``shuffle`` is false."""
    if not shuffle:
        return torch.arange(n, dtype=torch.int64)
    g = torch.Generator(device="cpu")
    g.manual_seed(_mix_seed(seed, epoch))
    return torch.randperm(n, generator=g, dtype=torch.int64)


class _Plan:
    """The index plan of one epoch for one rank (shared by the loader and its
    batch sampler without a reference cycle, so a dropped loader frees its
    worker processes at once)."""

    def __init__(self, perm: torch.Tensor, global_batch_size: int, rank: int, per_rank: int,
                 steps_per_epoch: int, start_step: int) -> None:
        self.perm = perm
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.per_rank = per_rank
        self.steps_per_epoch = steps_per_epoch
        self.start_step = start_step

    def global_batch(self, step: int) -> torch.Tensor:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        g = self.global_batch_size
        return self.perm[step * g : (step + 1) * g]

    def rank_batch(self, step: int) -> torch.Tensor:
        b = self.per_rank
        return self.global_batch(step)[self.rank * b : (self.rank + 1) * b]


class _RankBatchSampler:
    """Yields the rank's index lists of the plan's remaining steps."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.plan.start_step, self.plan.steps_per_epoch):
            yield self.plan.rank_batch(step).tolist()

    def __len__(self) -> int:
        return self.plan.steps_per_epoch - self.plan.start_step


class EpochLoader:
    """Iterates over the batches of one epoch that belong to one rank.

    * ``len(loader)`` is the number of batches the iterator yields:
      ``steps_per_epoch - start_step``; ``steps_per_epoch`` is
      ``n // global_batch_size`` with ``drop_last`` (an error if that is 0),
      else ``ceil(n / global_batch_size)``;
    * ``start_step`` skips the first global batches without decoding them;
    * with ``drop_last=False`` the last global batch is short and is cut by
      the same rule, so high ranks may get fewer (even zero) images in it --
      every rank still yields the same number of batches;
    * an in-memory data set (``in_memory``: a
      :class:`~swav.data.memory.TensorImageDataset`) is gathered in the main
      process (``get_batch``); an :class:`~swav.data.datasets.ImageFilesDataset`
      is decoded by a torch ``DataLoader`` with ``workers`` processes;
    * when every image this rank tried in the epoch was skipped, the iteration
      ends with :class:`~swav.data.datasets.EmptyDatasetError`.

    :meth:`set_epoch` re-targets the loader at another epoch, keeping
    persistent workers alive.
    """

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        start_step: int = 0,
        workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}"
            )
        if not isinstance(dataset, (TensorImageDataset, ImageFilesDataset)):
            raise TypeError(f"unsupported dataset type {type(dataset).__name__}")
        n = len(dataset)
        if n == 0:
            raise EmptyDatasetError(f"data set {getattr(dataset, 'name', dataset)!r} is empty")
        self.dataset = dataset
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank = self.global_batch_size // self.world_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.workers = int(workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = self.workers > 0 if persistent_workers is None else bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        if self.drop_last:
            self.steps_per_epoch = n // self.global_batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(
                    f"data set {getattr(dataset, 'name', '')!r} has {n} images, fewer than the global batch "
                    f"size {self.global_batch_size}: with drop_last=True an epoch would have no step"
                )
        else:
            self.steps_per_epoch = math.ceil(n / self.global_batch_size)
        self._dataloader = None
        self._plan = _Plan(torch.empty(0, dtype=torch.int64), self.global_batch_size, self.rank,
                           self.per_rank, self.steps_per_epoch, 0)
        self.set_epoch(epoch, start_step)

    # -- order ------------------------------------------------------------- #
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch = int(epoch)
        self.start_step = int(start_step)
        self._plan.perm = epoch_indices(len(self.dataset), self.seed, self.epoch, self.shuffle)
        self._plan.start_step = self.start_step

    def close(self) -> None:
        """Stop the worker processes now (they are also stopped when the loader is dropped)."""
        self._dataloader = None

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def global_batch_indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the whole global batch of ``step`` (all ranks)."""
        return self._plan.global_batch(step)

    def rank_batch_indices(self, step: int) -> torch.Tensor:
        """Dataset indices of this rank's part of the global batch of ``step``."""
        return self._plan.rank_batch(step)

    # -- iteration --------------------------------------------------------- #
    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def _make_dataloader(self):
        ds = self.dataset
        kwargs = {}
        if self.workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return torch.utils.data.DataLoader(
            ds,
            batch_sampler=_RankBatchSampler(self._plan),
            num_workers=self.workers,
            collate_fn=functools.partial(pad_collate, channels=ds.in_chans),
            pin_memory=self._pin(),
            worker_init_fn=_worker_init if self.workers > 0 else None,
            **kwargs,
        )

    def _batches(self) -> Iterator[Batch]:
        ds = self.dataset
        if ds.in_memory:
            pin = self._pin()
            for step in range(self.start_step, self.steps_per_epoch):
                batch = ds.get_batch(self.rank_batch_indices(step))
                yield batch.pin_memory() if pin else batch
        else:
            if self._dataloader is None or not self.persistent_workers:
                self._dataloader = self._make_dataloader()
            yield from self._dataloader

    def __iter__(self) -> Iterator[Batch]:
        tried = used = 0
        reasons: list[Skipped] = []
        for batch in self._batches():
            used += len(batch)
            tried += len(batch) + len(batch.skipped)
            if len(reasons) < 3:
                reasons += batch.skipped[: 3 - len(reasons)]
            yield batch
        if tried > 0 and used == 0:
            examples = "; ".join(f"{s.path}: {s.reason}" for s in reasons)
            raise EmptyDatasetError(
                f"data set {getattr(self.dataset, 'name', '')!r}: all {tried} images of epoch {self.epoch} "
                f"(rank {self.rank}) were skipped as unusable, e.g. {examples}"
            )

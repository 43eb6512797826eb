"""Features and prototype assignments for a folder of (unlabelled) images.

``embed_images`` writes, into one folder:

* ``features.npy``: float32 ``(N, D)``, one row per usable image, written batch by batch;
* ``files.txt``: the N image paths in row order, one per line, in the file system's own bytes;
  a backslash, tab, newline or carriage return inside a path is written as ``\\\\``, ``\\t``,
  ``\\n``, ``\\r``;
* ``skipped.txt``: ``path<TAB>reason`` of each unusable file (when there is one);
* ``embed.json``: what was done (checkpoint, data, counts, feature kind and size, seconds).

``cluster_images`` writes ``assignments.csv`` with the columns ``path,prototype,score`` (score: the
cosine similarity to the chosen prototype; paths quoted by the csv module when needed).

An unusable file (unreadable, truncated, not an image, a decompression bomb, ...) is logged by name
with the reason and counted; it never stops the run.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swav import __version__
from swav.data.datasets import ImageFilesDataset
from swav.eval.clusters import PrototypeScores, assign
from swav.eval.data import BatchStream, progress_printer
from swav.eval.features import extract_features

__all__ = ["embed_images", "cluster_images", "FEATURE_KINDS", "escape_path"]

log = logging.getLogger("swav")

FEATURE_KINDS = ("backbone", "projection")


def escape_path(path: str) -> bytes:
    """A path as one line of bytes (see the module docstring)."""
    b = os.fsencode(path)
    return b.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _name_of(dataset, i: int) -> str:
    if isinstance(dataset, ImageFilesDataset):
        return dataset.path(i)
    return f"{getattr(dataset, 'name', 'data')}[{i}]"


class _Projection(nn.Module):
    """images -> L2-normalised projection z (the embedding the prototypes score)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        z, _ = self.model.forward_head(self.model.backbone(x))
        return z


def _batches(dataset, data, progress: bool, desc: str) -> BatchStream:
    return BatchStream(data.loader(dataset), progress_printer(desc, progress))


def _write_skipped(path: Path, skipped) -> None:
    if not skipped:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    with open(path, "wb") as f:
        for s in skipped:
            f.write(escape_path(s.path) + b"\t" + s.reason.replace("\n", " ").encode("utf-8", "replace") + b"\n")


def embed_images(loaded, dataset, data, out_dir: str | os.PathLike, device, *, features: str = "backbone",
                 progress: bool = True) -> dict:
    """Write the features of every usable image of ``dataset`` into ``out_dir`` (see the module
    docstring). Returns the summary that is also written to ``embed.json``."""
    t0 = time.perf_counter()
    if features not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {features!r}; choose {' or '.join(FEATURE_KINDS)}")
    if features == "projection":
        if loaded.model is None:
            raise ValueError(f"{loaded.path} has no projection head (a backbone-only file): use --features backbone")
        model, dim = _Projection(loaded.model), int(loaded.model.projection_head.out_dim)
    else:
        model, dim = loaded.backbone, int(loaded.backbone.num_features)
    device = torch.device(device)
    model = model.to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    final = out / "features.npy"
    tmp = out / f".features.npy.tmp-{os.getpid()}"
    transform = data.transform(dataset).to(device)
    stream = _batches(dataset, data, progress, "embed")
    rows = 0
    names: list[str] = []
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for batch in stream:
            feats, _, idx = extract_features(model, [batch], transform, device)
            mm[rows:rows + feats.shape[0]] = feats.numpy()
            rows += feats.shape[0]
            names.extend(_name_of(dataset, i) for i in idx.tolist())
        mm.flush()
        del mm
        if rows == n:
            os.replace(tmp, final)
        else:  # some files were unusable: keep the first `rows` rows
            tmp2 = out / f".features.npy.tmp2-{os.getpid()}"
            try:
                src = np.load(tmp, mmap_mode="r")
                dst = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.float32, shape=(rows, dim))
                for s in range(0, rows, 65536):
                    e = min(rows, s + 65536)
                    dst[s:e] = src[s:e]
                dst.flush()
                del dst, src
                os.replace(tmp2, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp2.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with open(out / "files.txt", "wb") as f:
        for name in names:
            f.write(escape_path(name) + b"\n")
    _write_skipped(out / "skipped.txt", stream.skipped)
    summary = {"checkpoint": str(Path(loaded.path).resolve()), "data": str(data.source), "features": features,
               "dim": dim, "images": rows, "skipped": len(stream.skipped), "files": n,
               "seconds": round(time.perf_counter() - t0, 3), "version": __version__}
    (out / "embed.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cluster_images(loaded, dataset, data, out_csv: str | os.PathLike, device, *, method: str = "argmax",
                   head: int = 0, epsilon: float = 0.05, iterations: int = 3, progress: bool = True) -> dict:
    """Assign every usable image of ``dataset`` to a prototype; write ``path,prototype,score`` rows
    to ``out_csv``. ``method="sinkhorn"`` assigns over the whole set at once (all scores are kept
    in memory). Returns a summary (images, skipped, prototypes used, seconds)."""
    t0 = time.perf_counter()
    if loaded.model is None:
        raise ValueError(f"{loaded.path} has no prototypes (a backbone-only file): swav cluster needs a run "
                         "checkpoint or an official SwAV file")
    if method not in ("argmax", "sinkhorn"):
        raise ValueError(f"unknown assignment method {method!r}; use argmax or sinkhorn")
    device = torch.device(device)
    scorer = PrototypeScores(loaded.model, head).to(device)
    transform = data.transform(dataset).to(device)
    stream = _batches(dataset, data, progress, "cluster")
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    used: set[int] = set()
    rows = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "prototype", "score"])
            pending = []
            for batch in stream:
                scores, _, idx = extract_features(scorer, [batch], transform, device)
                if method == "sinkhorn":
                    pending.append((scores, idx))
                    continue
                proto, score = assign(scores, "argmax")
                for i, p, s in zip(idx.tolist(), proto.tolist(), score.tolist()):
                    writer.writerow([_name_of(dataset, i), p, f"{s:.6f}"])
                used.update(proto.tolist())
                rows += len(idx)
            if pending:
                scores = torch.cat([s for s, _ in pending])
                idx = torch.cat([i for _, i in pending])
                proto, score = assign(scores, "sinkhorn", epsilon, iterations)
                for i, p, s in zip(idx.tolist(), proto.tolist(), score.tolist()):
                    writer.writerow([_name_of(dataset, i), p, f"{s:.6f}"])
                used.update(proto.tolist())
                rows += len(idx)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    k = loaded.model.prototypes.weights()[head].shape[0]
    return {"images": rows, "skipped": len(stream.skipped), "skipped_files": stream.skipped,
            "prototypes_used": len(used), "prototypes": int(k), "seconds": round(time.perf_counter() - t0, 3)}

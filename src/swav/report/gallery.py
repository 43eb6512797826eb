"""What the network learned, read off its checkpoint: prototype galleries and embeddings of images.

The model of a run is rebuilt from the config stored in its checkpoint and loaded strictly. Images
go through the evaluation transform the trainer's kNN monitor uses (resize + centre crop for image
files; the native size for the in-memory built-ins), then through the backbone (pooled features,
for the embedding map) and the projection head (unit-norm z, scored against the unit-norm
prototypes, for the gallery). An image belongs to the prototype it scores highest against.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Embeddings", "GalleryRow", "Gallery", "load_model", "open_split", "sample_indices", "embed",
           "build_gallery", "thumbnail", "thumbnail_png"]


@dataclass
class Embeddings:
    """Outputs of the network for some images of one split (rows follow ``indices``)."""

    indices: np.ndarray  # dataset indices of the images that could be used
    features: np.ndarray  # (N, F) pooled backbone features
    z: np.ndarray  # (N, D) unit-norm projections
    labels: np.ndarray | None  # (N,) or None when the split has no labels
    skipped: int = 0  # images that could not be decoded


@dataclass
class GalleryRow:
    prototype: int
    count: int  # sampled images whose nearest prototype this is
    indices: list[int]  # dataset indices of the images shown, best-scoring first
    scores: list[float]
    label_share: tuple[str, float] | None = None  # most common label among `count` images and its share


@dataclass
class Gallery:
    rows: list[GalleryRow]
    counts: np.ndarray  # (K,) images per prototype over the whole sample
    n_images: int
    purity: float | None = None  # share of sampled images whose prototype's majority label is theirs
    notes: list[str] = field(default_factory=list)


def load_model(state: dict[str, Any]):
    """(model in eval mode, Config) from a run state (see ``swav.checkpoint.load_run_state``)."""
    from swav.config import from_dict
    from swav.build import build_model

    cfg = from_dict(state["config"])
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
        model = build_model(cfg)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return model, cfg


def open_split(cfg, split: str, source: str | None = None):
    """The ``split`` of the run's data source (or of ``source``), never downloading anything; the
    training split as the run saw it (``data.subset``)."""
    from swav.eval.data import EvalData

    data = EvalData.from_config(cfg, source=source, download=False)
    return data.split(split, cfg.data.subset if split == "train" else 0)


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``min(n, k)`` distinct indices out of ``range(n)``, sorted, the same for the same seed."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class _Embedder(nn.Module):
    """Backbone features and unit-norm projections side by side, as one (N, F + D) tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        feats = self.model.backbone(x)
        z, _ = self.model.forward_head(feats)
        return torch.cat([feats.float(), z.float()], dim=1)


def embed(model, cfg, dataset, indices: np.ndarray, device: torch.device, batch_size: int = 256) -> Embeddings:
    """Run the network over ``dataset[indices]`` with the run's evaluation transform (the one path of
    ``swav.eval.data``, as the kNN monitor and ``swav eval``)."""
    from swav.eval.data import EvalData
    from swav.eval.features import extract_features

    data = EvalData.from_config(cfg, download=False, batch_size=batch_size)
    model = model.to(device)
    out, labels, idx = extract_features(_Embedder(model), data.batches(dataset, indices),
                                        data.transform(dataset).to(device), device)
    nfeat = out.shape[1] - cfg.model.feat_dim
    lab = labels.numpy() if getattr(dataset, "has_labels", False) else None
    return Embeddings(indices=idx.numpy(), features=out[:, :nfeat].numpy(), z=out[:, nfeat:].numpy(), labels=lab,
                      skipped=len(indices) - len(idx))


def prototype_matrix(model) -> np.ndarray:
    """The first head's prototypes, unit-norm, (K, D)."""
    w = model.prototypes.weights()[0].detach().float().cpu()
    return torch.nn.functional.normalize(w, dim=1).numpy()


def build_gallery(emb: Embeddings, prototypes: np.ndarray, *, rows: int = 12, per_row: int = 10,
                  class_names: list[str] | None = None) -> Gallery:
    """The ``rows`` most used prototypes, each with its ``per_row`` best-scoring assigned images."""
    scores = emb.z @ prototypes.T  # (N, K) cosine similarities
    assign = scores.argmax(axis=1)
    k = prototypes.shape[0]
    counts = np.bincount(assign, minlength=k)
    order = np.argsort(-counts, kind="stable")
    out_rows: list[GalleryRow] = []
    majority_hits = 0
    if emb.labels is not None:
        for p in np.nonzero(counts)[0]:
            majority_hits += int(np.bincount(emb.labels[assign == p]).max())
    for p in order[:rows]:
        if counts[p] == 0:
            break
        members = np.nonzero(assign == p)[0]
        best = members[np.argsort(-scores[members, p], kind="stable")][:per_row]
        share = None
        if emb.labels is not None:
            bc = np.bincount(emb.labels[members])
            top = int(bc.argmax())
            name = class_names[top] if class_names and top < len(class_names) else str(top)
            share = (name, float(bc[top]) / len(members))
        out_rows.append(GalleryRow(prototype=int(p), count=int(counts[p]),
                                   indices=[int(emb.indices[i]) for i in best],
                                   scores=[float(scores[i, p]) for i in best], label_share=share))
    purity = majority_hits / len(assign) if emb.labels is not None and len(assign) else None
    return Gallery(rows=out_rows, counts=counts, n_images=len(assign), purity=purity)


def thumbnail(dataset, index: int, size: int = 84) -> np.ndarray | None:
    """The centre square of image ``index`` as uint8 (size, size) grey or (size, size, 3) colour.

    Small images are enlarged with nearest-neighbour sampling so their pixels stay sharp; large
    ones are reduced with a Lanczos filter. None when the image cannot be decoded.
    """
    from PIL import Image

    if dataset.in_memory:
        img = dataset.images[int(index)]
    else:
        item = dataset[int(index)]
        if not isinstance(item, tuple):  # Skipped
            return None
        img = item[0]
    arr = img.permute(1, 2, 0).contiguous().numpy()
    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    arr = arr[top:top + s, left:left + s]
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    resample = Image.NEAREST if s < size else Image.LANCZOS
    if s != size:
        if s < size and size % s:  # keep whole pixels: the largest integer factor, then pad-free resize
            factor = max(1, size // s)
            pil = pil.resize((s * factor, s * factor), Image.NEAREST)
        else:
            pil = pil.resize((size, size), resample)
    return np.asarray(pil)


def thumbnail_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()

"""Charts of the report, drawn with matplotlib's Agg backend into PNG bytes (no display needed)."""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

__all__ = ["Figure", "training_curves", "usage_distribution", "embedding_map", "png_bytes"]

_BLUE, _ORANGE, _GREY, _RED = "#1f77b4", "#ff7f0e", "#7f7f7f", "#d62728"


def _plt():
    from swav.extras import require

    matplotlib = require("matplotlib", "the report's charts")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot", "the report's charts")


class Figure:
    """A rendered chart: PNG bytes, a title and a caption for the page."""

    def __init__(self, key: str, title: str, png: bytes, caption: str = ""):
        self.key, self.title, self.png, self.caption = key, title, png, caption


def png_bytes(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        xs.append(float(r["step"]))
        ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def _axes(title: str, ylabel: str, xlabel: str = "step"):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _epoch_axis(ax, steps_per_epoch: int | None) -> None:
    """A secondary x axis in epochs on top, when the number of steps per epoch is known."""
    if steps_per_epoch:
        sec = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        sec.set_xlabel("epoch", fontsize=8)
        sec.tick_params(labelsize=7)


def training_curves(records: Sequence[dict[str, Any]], num_prototypes: int | None,
                    steps_per_epoch: int | None = None) -> list[Figure]:
    """Loss (with the ln K collapse line), learning rate, throughput, prototype usage, entropies, kNN."""
    figs: list[Figure] = []
    x, y = _series(records, "loss")
    if len(x):
        fig, ax = _axes("SwAV loss", "loss")
        ax.plot(x, y, color=_BLUE, lw=1.2, label="loss")
        caption = "Swapped-prediction loss, averaged over processes, at each logged step."
        if num_prototypes and num_prototypes > 1:
            lnk = math.log(num_prototypes)
            ax.axhline(lnk, color=_RED, ls="--", lw=1, label=f"ln K = {lnk:.2f} (collapse)")
            caption += (f" The dashed line is ln K = ln {num_prototypes}: the loss of uniform predictions. "
                        "A loss that stays on it means collapse (see the README's troubleshooting).")
        finite = y[np.isfinite(y)]
        if len(finite):
            lo = min(float(finite.min()), math.log(num_prototypes) if num_prototypes else float(finite.min()))
            hi = max(float(np.percentile(finite, 99)), math.log(num_prototypes) if num_prototypes else lo)
            pad = 0.05 * max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + 3 * pad)
        ax.legend(fontsize=8)
        _epoch_axis(ax, steps_per_epoch)
        figs.append(Figure("loss", "Loss", png_bytes(fig), caption))

    x, y = _series(records, "lr")
    if len(x):
        fig, ax = _axes("Learning rate", "lr")
        ax.plot(x, y, color=_BLUE, lw=1.2)
        _epoch_axis(ax, steps_per_epoch)
        figs.append(Figure("lr", "Learning rate", png_bytes(fig),
                           "The learning rate of every step (the schedule: linear warmup, then cosine decay to optim.final_lr)."))

    x, y = _series(records, "images_per_s")
    if len(x):
        fig, ax = _axes("Throughput", "images / s (all processes)")
        ax.plot(x, y, color=_BLUE, lw=1.2, label="images/s")
        ax.set_ylim(bottom=0)
        xd, yd = _series(records, "data_time_fraction")
        caption = "Training images per second over all processes, between logged steps."
        if len(xd):
            ax2 = ax.twinx()
            ax2.plot(xd, yd, color=_ORANGE, lw=1, alpha=0.8, label="data-wait fraction")
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("fraction of time waiting for data", color=_ORANGE, fontsize=8)
            caption += (" Orange: the fraction of that time spent waiting for the data loader; near 1 means "
                        "the data pipeline is the bottleneck (raise data.workers).")
        _epoch_axis(ax, steps_per_epoch)
        figs.append(Figure("throughput", "Images per second", png_bytes(fig), caption))

    x, y = _series(records, "prototype_usage")
    if len(x):
        fig, ax = _axes("Prototype usage", "fraction of prototypes used")
        ax.plot(x, y, color=_BLUE, lw=1.2)
        ax.set_ylim(0, 1.05)
        _epoch_axis(ax, steps_per_epoch)
        figs.append(Figure("prototype-usage", "Prototype usage", png_bytes(fig),
                           "Fraction of the K prototypes that are the top assignment of at least one image of "
                           "the logged batch. A fall towards 1/K is a sign of collapse."))

    xa, ya = _series(records, "assignment_entropy")
    xu, yu = _series(records, "usage_entropy")
    if len(xa) or len(xu):
        fig, ax = _axes("Entropies of the codes", "nats")
        if len(xa):
            ax.plot(xa, ya, color=_BLUE, lw=1.2, label="assignment entropy (per image)")
        if len(xu):
            ax.plot(xu, yu, color=_ORANGE, lw=1.2, label="usage entropy (over the batch)")
        top = max([float(np.nanmax(v)) for v in (ya, yu) if len(v) and np.isfinite(v).any()] or [1.0])
        if num_prototypes and num_prototypes > 1:
            ax.axhline(math.log(num_prototypes), color=_GREY, ls="--", lw=1, label="ln K (maximum)")
            top = max(top, math.log(num_prototypes))
        ax.set_ylim(0, 1.08 * top)
        ax.legend(fontsize=8)
        _epoch_axis(ax, steps_per_epoch)
        figs.append(Figure("entropy", "Assignment entropy", png_bytes(fig),
                           "Blue: mean entropy of one image's code q (low = confident assignments). Orange: "
                           "entropy of how the batch spreads over the prototypes (ln K = perfectly even)."))

    knn_keys = sorted({k for r in records for k in r if k.startswith("knn_top")})
    if knn_keys:
        fig, ax = _axes("Online kNN accuracy (test split)", "top-1 / top-5 %")
        for key, color in zip(knn_keys, (_BLUE, _ORANGE, _GREY, _RED)):
            xk, yk = _series(records, key)
            ax.plot(xk, yk, "o-", color=color, lw=1.2, ms=4, label=key)
        ax.legend(fontsize=8)
        _epoch_axis(ax, steps_per_epoch)
        figs.append(Figure("knn", "Online kNN", png_bytes(fig),
                           "Weighted kNN accuracy of the backbone's features, measured during training "
                           "(train.knn_every)."))
    return figs


def usage_distribution(counts: np.ndarray, n_images: int) -> Figure:
    """Images per prototype, prototypes sorted from most to least used, with the uniform level."""
    k = len(counts)
    order = np.sort(counts)[::-1]
    fig, ax = _axes("How the sampled images spread over the prototypes", "images", "prototype rank")
    ax.bar(np.arange(k), order, width=1.0, color=_BLUE, edgecolor="none")
    ax.axhline(n_images / max(k, 1), color=_RED, ls="--", lw=1, label=f"uniform ({n_images / max(k, 1):.1f})")
    ax.set_xlim(-0.5, k - 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    used = int((counts > 0).sum())
    return Figure("usage-distribution", "Usage distribution", png_bytes(fig),
                  f"{used} of {k} prototypes are the nearest prototype of at least one of the {n_images} sampled "
                  "training images; bars are sorted by count. SwAV's equipartition pushes towards the dashed line.")


def embedding_map(xy: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None,
                  thumbs: list[tuple[int, np.ndarray]], title: str, caption: str) -> Figure:
    """A 2-D scatter of embeddings, coloured by label, with a few image thumbnails placed at their points.

    ``thumbs``: (row index in ``xy``, image H x W or H x W x 3 uint8) pairs.
    """
    plt = _plt()
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = plt.subplots(figsize=(9, 7.5))
    size = 9 if len(xy) > 1000 else 16
    if labels is not None and len(labels) and labels.min() >= 0:
        uniq = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(uniq) <= 10 else "tab20")
        for j, lab in enumerate(uniq):
            sel = labels == lab
            name = class_names[lab] if class_names and 0 <= lab < len(class_names) else str(lab)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(j % cmap.N), alpha=0.7, label=name,
                       edgecolors="none")
        if len(uniq) <= 20:
            ax.legend(fontsize=8, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color=_BLUE, alpha=0.6, edgecolors="none")
    span = float(np.ptp(xy[:, 0])) if len(xy) else 1.0
    for row, img in thumbs:
        side = max(img.shape[0], img.shape[1])
        zoom = 32.0 / side  # about 32 px on the figure whatever the image size
        box = OffsetImage(img, zoom=zoom, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ab = AnnotationBbox(box, (xy[row, 0], xy[row, 1]), frameon=True, pad=0.1,
                            bboxprops={"edgecolor": "#333333", "lw": 0.6})
        ax.add_artist(ab)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.margins(0.04 if span else 0.1)
    return Figure("embedding-map", "Embedding map", png_bytes(fig), caption)

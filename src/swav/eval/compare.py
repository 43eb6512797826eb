"""What a run learned, side by side with what it is measured against: the learned backbone, the
same network at initialisation and the raw pixels, each under one protocol.

Two measures of frozen features (train split -> test split, no augmentation):

* kNN top-1: cosine similarity of L2-normalised vectors, the k nearest training images voting
  with weight exp(sim / 0.07), the whole train split as memory (``swav.eval.knn.knn_accuracy``);
* a linear probe: features standardised with the train split's per-dimension mean and std, a
  linear layer trained with SGD (momentum 0.9, lr 0.1 cosine, batch 256) for ``linear_epochs``.

The raw pixels are the images as the model gets them (the evaluation transform), flattened, then
standardised per pixel with the train split's statistics. On Fashion-MNIST they give about 85.7 %
kNN and 84.4 % linear: features that do not beat them have not learned much yet.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from swav.eval.data import EvalData, extract
from swav.eval.knn import knn_accuracy
from swav.eval.linear import CachedFeatures, train_linear_classifier

__all__ = ["Comparison", "compare_features", "standardise", "verdict", "SUBJECTS"]

log = logging.getLogger("swav")

SUBJECTS = ("learned", "init", "pixels")
LABELS = {"learned": "learned backbone", "init": "same network at init", "pixels": "raw pixels"}


@dataclass
class Comparison:
    """kNN and linear top-1 (%) of each subject, the protocol, and a one-line verdict."""

    knn: dict[str, float] = field(default_factory=dict)      # subject -> kNN top-1 %
    linear: dict[str, float] = field(default_factory=dict)   # subject -> linear probe top-1 %
    k: int = 20
    linear_epochs: int = 30
    train_images: int = 0
    test_images: int = 0

    @property
    def verdict(self) -> str:
        return verdict(self)

    def table(self, dataset: str) -> str:
        """The plain-text table the demo closes with."""
        lines = [f"frozen features on the {dataset} test set ({self.train_images} training images as kNN memory "
                 f"and probe data, {self.test_images} test images):",
                 f"  {'':24s} {'kNN top-1 (k=' + str(self.k) + ')':>18s} {'linear probe top-1':>20s}"]
        for s in SUBJECTS:
            if s in self.knn:
                lines.append(f"  {LABELS[s]:24s} {self.knn[s]:16.2f} % {self.linear.get(s, float('nan')):18.2f} %")
        lines.append(f"  verdict: {self.verdict}")
        return "\n".join(lines)


def verdict(c: Comparison) -> str:
    """One line: does the learned backbone beat the network at initialisation and the raw pixels?"""
    def gap(measure: dict, other: str) -> float:
        return measure["learned"] - measure[other]

    beats = {o: gap(c.knn, o) > 0 and (not c.linear or gap(c.linear, o) > 0) for o in ("init", "pixels")}
    knn_p, knn_i = gap(c.knn, "pixels"), gap(c.knn, "init")
    lin = f", linear {gap(c.linear, 'pixels'):+.1f}" if c.linear else ""
    if beats["init"] and beats["pixels"]:
        return (f"learned: the features beat the raw pixels (kNN {knn_p:+.1f}{lin} points) and the untrained "
                f"network (kNN {knn_i:+.1f} points)")
    if beats["init"] and c.linear and gap(c.linear, "pixels") > 0 and knn_p <= 0:
        return (f"partly learned: the features beat the raw pixels under the linear probe "
                f"({gap(c.linear, 'pixels'):+.1f} points) but not under kNN ({knn_p:+.1f}), and the untrained "
                f"network (kNN {knn_i:+.1f} points)")
    if beats["init"]:
        return (f"learning, not there yet: better than the untrained network (kNN {knn_i:+.1f} points) but not "
                f"than the raw pixels (kNN {knn_p:+.1f}{lin} points); train longer or tune the recipe")
    return (f"not learned: no better than the untrained network (kNN {knn_i:+.1f} points; raw pixels "
            f"{knn_p:+.1f}); check the recipe (lr, crops) and the data")


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets standardised per dimension with the train set's mean and std (a constant
    dimension is only centred)."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def compare_features(learned: nn.Module, init: nn.Module, data: EvalData, device, *, k: int = 20,
                     max_train: int = 0, linear_epochs: int = 30, seed: int = 0) -> Comparison:
    """kNN and linear probe of ``learned`` and ``init`` (backbones giving pooled features) and of
    the raw pixels, on ``data``'s labelled train (its first ``max_train`` images; 0 = all) and test
    splits."""
    train_set, test_set = data.labelled("train", max_train), data.labelled("test")
    out = Comparison(k=k, linear_epochs=linear_epochs)
    for subject, net in (("learned", learned), ("init", init), ("pixels", nn.Flatten())):
        ftr, ltr, _ = extract(net, data, train_set, device, f"{subject} features (train)", progress=False)
        fte, lte, _ = extract(net, data, test_set, device, f"{subject} features (test)", progress=False)
        num_classes = int(max(ltr.max(), lte.max())) + 1
        if subject == "pixels":  # standardised per pixel, as the reference figures
            ftr, fte = standardise(ftr, fte)
        out.train_images, out.test_images = len(ltr), len(lte)
        out.knn[subject] = float(knn_accuracy(ftr, ltr, fte, lte, num_classes, ks=(k,))[f"knn_top1@{k}"])
        if linear_epochs > 0:
            str_, ste = standardise(ftr, fte)
            res = train_linear_classifier(CachedFeatures(str_, ltr), ste, lte, num_classes, epochs=linear_epochs,
                                          lr=0.1, seed=seed, prefix=f"{subject}_linear")
            out.linear[subject] = float(res[f"{subject}_linear_top1"])
        log.info("final comparison, %s: kNN top-1 %.2f %%%s", LABELS[subject], out.knn[subject],
                 f", linear top-1 {out.linear[subject]:.2f} %" if subject in out.linear else "")
    return out

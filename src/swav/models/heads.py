"""Projection head and prototypes of SwAV (official key names: ``projection_head.{0,1,3}``,
``prototypes.weight`` or ``prototypes.prototypes{i}.weight`` for several heads)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionHead", "Prototypes"]


class ProjectionHead(nn.Sequential):
    """features (B, in_dim) -> (B, out_dim): Linear, BatchNorm1d, ReLU, Linear (official, 2048 ->
    2048 -> 128 for ResNet-50), or a single Linear when ``hidden_dim`` is 0."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        if hidden_dim > 0:
            layers = [nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                      nn.Linear(hidden_dim, out_dim)]
        else:
            layers = [nn.Linear(in_dim, out_dim)]
        super().__init__(*layers)
        self.out_dim = out_dim


class Prototypes(nn.Module):
    """The prototype matrix C (K x D) without bias; scores = z C^T.

    With an int ``nmb_prototypes`` the module holds ``weight`` (K x D) directly; with a list it holds
    one ``prototypes{i}`` Linear per head and returns a list of score matrices.
    """

    def __init__(self, dim: int, nmb_prototypes: int | list[int]):
        super().__init__()
        self.multi = isinstance(nmb_prototypes, (list, tuple))
        if self.multi:
            for i, k in enumerate(nmb_prototypes):
                self.add_module(f"prototypes{i}", nn.Linear(dim, int(k), bias=False))
            self.nmb_prototypes = [int(k) for k in nmb_prototypes]
        else:
            # same initialisation as nn.Linear(dim, K, bias=False)
            self.weight = nn.Parameter(nn.Linear(dim, int(nmb_prototypes), bias=False).weight.detach().clone())
            self.nmb_prototypes = int(nmb_prototypes)

    def weights(self) -> list[torch.Tensor]:
        """The prototype matrices, one (K_h x D) per head."""
        if self.multi:
            return [getattr(self, f"prototypes{i}").weight for i in range(len(self.nmb_prototypes))]
        return [self.weight]

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere (done before every training step)."""
        for w in self.weights():
            w.copy_(F.normalize(w, dim=1, p=2))

    def drop_grad_(self) -> None:
        """Drop the prototypes' gradients (set to None) so the optimizer skips them: how the first
        steps freeze the prototypes (paper Sec. 4), without touching ``requires_grad``."""
        for w in self.weights():
            w.grad = None

    def forward(self, z: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """z (B, D) -> scores (B, K), or a list of (B, K_h) for several heads."""
        scores = [z @ w.t() for w in self.weights()]
        return scores if self.multi else scores[0]

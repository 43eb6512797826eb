"""The SwAV network: backbone -> projection head -> L2 normalisation -> prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swav.models.heads import ProjectionHead, Prototypes

__all__ = ["SwAVModel"]


class SwAVModel(nn.Module):
    """Backbone + projection head + prototypes.

    Args:
        backbone: any module mapping images (B, C, H, W) to pooled features (B, F); its
            ``num_features`` attribute (or ``feature_dim``) gives F unless ``num_features`` is passed.
        hidden_mlp: hidden width of the projection head (0 = one linear layer).
        feat_dim: D, the embedding dimension.
        nmb_prototypes: K, or a list of K_h for several prototype heads.
        normalize: L2-normalise the embedding (the paper always does).
    """

    def __init__(self, backbone: nn.Module, hidden_mlp: int = 2048, feat_dim: int = 128,
                 nmb_prototypes: int | list[int] = 3000, normalize: bool = True, num_features: int | None = None):
        super().__init__()
        if num_features is None:
            num_features = getattr(backbone, "num_features", None) or getattr(backbone, "feature_dim", None)
        if not num_features:
            raise ValueError("cannot tell the backbone's feature size: give num_features= or set backbone.num_features")
        self.backbone = backbone
        self.projection_head = ProjectionHead(int(num_features), hidden_mlp, feat_dim)
        self.prototypes = Prototypes(feat_dim, nmb_prototypes)
        self.normalize = normalize

    def forward_backbone(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Pooled features of all crops, crop-major (V*B, F). Crops of equal resolution that follow
        each other go through the backbone as one batch, as in the official code."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = crops[start] if end == start + 1 else torch.cat(crops[start:end])
            feats.append(self.backbone(x))
            start = end
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    def forward_head(self, features: torch.Tensor):
        """features (N, F) -> (z (N, D), scores (N, K) or a list per head).

        The head's first layer (F -> hidden, its largest matrix product when F is wide: 2,048 x 512
        with the fashion-mnist preset's 4x4 grid) runs in the surrounding autocast precision, as the
        backbone does. Its output and everything after it (BatchNorm, the second layer, z, the
        scores) run in float32 even under autocast: Sinkhorn divides the scores by eps (0.05), so
        bf16 rounding of the scores (~0.004 near 1) would become noise in Q. A one-layer head
        (hidden_mlp 0) produces z itself, so it runs in float32 too.
        """
        layers = list(self.projection_head)
        h = features
        if len(layers) > 1:
            h = layers[0](h)  # (N, hidden) h = W_1 x + b_1, in the autocast precision
            layers = layers[1:]
        with torch.autocast(features.device.type, enabled=False):
            return self._head(layers, h.float())

    def _head(self, layers: list[nn.Module], h: torch.Tensor):
        for layer in layers:
            h = layer(h)
        z = F.normalize(h, dim=1, p=2) if self.normalize else h  # (N, D)
        return z, self.prototypes(z)

    def forward(self, crops: list[torch.Tensor]):
        """crops: V tensors (B, C, H_v, W_v) -> (embedding z (V*B, D), scores (V*B, K))."""
        return self.forward_head(self.forward_backbone(crops))

"""The Stage-2 discriminator (DESIGN.md §5): small Conv3D heads on frozen-teacher features at a few blocks.

Each head maps one block's unpatchified features (B, D, F, H, W) to patch logits (B, 1, F, H, W); the loss averages
over heads. The teacher itself is not part of this module (it stays frozen and out of checkpoints); callers pass
the features from `wan_parts.block_features`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class ConvHead(nn.Sequential):
    """Conv3d 3x3x3 -> GroupNorm -> SiLU -> Conv3d 1x1x1 to one logit per patch."""

    def __init__(self, dim: int, hidden_dim: int, groups: int = 8) -> None:
        super().__init__(nn.Conv3d(dim, hidden_dim, 3, padding=1), nn.GroupNorm(min(groups, hidden_dim), hidden_dim),
                         nn.SiLU(), nn.Conv3d(hidden_dim, 1, 1))


class Discriminator(ModelMixin, ConfigMixin):
    """One `ConvHead` per feature block of the frozen teacher.

    Args:
        dim: the teacher's width D.
        feature_blocks: 0-based teacher blocks whose outputs are read ((15, 22, 29) for Wan 1.3B, (19, 29, 39) for
            14B in the TMD paper; NVIDIA FastGen uses (21, 30, 39) for 14B).
        hidden_dim: width of each head.
    """

    @register_to_config
    def __init__(self, dim: int, feature_blocks: tuple[int, ...] = (15, 22, 29), hidden_dim: int = 256) -> None:
        super().__init__()
        self.feature_blocks = [int(b) for b in feature_blocks]
        self.heads = nn.ModuleList([ConvHead(dim, hidden_dim) for _ in self.feature_blocks])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        param_dtype = self.heads[0][0].weight.dtype
        return [head(f.to(param_dtype)) for head, f in zip(self.heads, features, strict=True)]

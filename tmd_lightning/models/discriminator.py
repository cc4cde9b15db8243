"""The Stage-2 discriminator: Conv3D heads on frozen-teacher features at a few blocks (docs/method.md, Stage 2).

Each head maps one block's unpatchified features (B, D, F, H, W) to patch logits; the loss averages over patches
and heads. The teacher itself is not part of this module (it stays frozen and out of checkpoints); callers pass the
features from `wan_parts.block_features`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def _groups(channels: int, most: int = 32) -> int:
    """The largest group count <= `most` that divides `channels` (32 for Wan's widths, fewer for tiny tests)."""
    return max(g for g in range(1, most + 1) if channels % g == 0)


class ConvHead(nn.Sequential):
    """GroupNorm -> Conv3d(D -> w, k3, stride (1, 2, 2)) -> SiLU -> Conv3d(w -> w, k3, stride 2) -> SiLU ->
    Conv3d(w -> 1, k1): one logit per (downsampled) patch.

    Three layers, not one: the TMD paper's heads total 68 M parameters at 1.3B (14B: 172 M); with width w the head
    has 27 (D w + w^2) weights, so w = 432 (1.3B) and w = 384 (14B) land within 2 % of those totals.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__(nn.GroupNorm(_groups(dim), dim),
                         nn.Conv3d(dim, hidden_dim, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
                         nn.Conv3d(hidden_dim, hidden_dim, 3, stride=2, padding=1), nn.SiLU(),
                         nn.Conv3d(hidden_dim, 1, 1))


class Discriminator(ModelMixin, ConfigMixin):
    """One `ConvHead` per feature block of the frozen teacher.

    Args:
        dim: the teacher's width D.
        feature_blocks: 0-based teacher blocks whose outputs are read ((15, 22, 29) for Wan 1.3B, (19, 29, 39) for
            14B in the TMD paper; NVIDIA FastGen uses (21, 30, 39) for 14B).
        hidden_dim: width w of each head (the model config's `disc_width`: 432 for 1.3B, 384 for 14B).
    """

    @register_to_config
    def __init__(self, dim: int, feature_blocks: tuple[int, ...] = (15, 22, 29), hidden_dim: int = 432) -> None:
        super().__init__()
        self.feature_blocks = [int(b) for b in feature_blocks]
        self.heads = nn.ModuleList([ConvHead(dim, hidden_dim) for _ in self.feature_blocks])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        param_dtype = self.heads[0][1].weight.dtype
        # contiguous: the unpatchified features are a channels-last view, and GroupNorm's CPU backward on such a
        # view crashes the process (torch 2.13)
        return [head(f.to(param_dtype).contiguous()) for head, f in zip(self.heads, features, strict=True)]


def head_parameters(dim: int, hidden_dim: int) -> int:
    """Parameters of one `ConvHead`, counted from its layers' shapes (how the widths were chosen)."""
    k = 27  # 3 x 3 x 3 kernels
    return 2 * dim + (k * dim * hidden_dim + hidden_dim) + (k * hidden_dim ** 2 + hidden_dim) + (hidden_dim + 1)

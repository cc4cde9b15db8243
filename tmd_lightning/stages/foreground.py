"""The toy's shape-weighted losses: a per-latent weight `1 + w * mask` on the moving shape and the pixel ring around
it: the toy teacher's flow-matching loss (`stage.foreground_weight`: 8 in `experiment=teacher`) and, as
probes off by default, Stage 1's TM-MeanFlow loss and Stage 2's fake-score loss (on the decoded student samples).

Why: on the 16 x 16 toy a square and a circle differ in a few corner pixels, a tiny share of an unweighted loss; the
toy teacher bound the shape word only with this weight (README, "The shipped toy teacher"). The mask is drawn in
pixels and laid out as latents by the pixel codec, so it needs the toy's `PixelCodec` and decoded videos.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tmd_lightning.models import PixelCodec


def foreground_mask(videos: torch.Tensor, threshold: float = 8.0, ring: int = 1) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 videos -> (B, F, H, W, 1) bool: pixels whose colour differs from the clip's background
    (the per-channel median over the clip, as the shape covers far less than half of it) by more than `threshold`
    levels in any channel, grown by `ring` pixels so that the background just around a shape, where a square and a
    circle differ, counts as well."""
    v = videos.float()
    background = v.flatten(1, 3).median(dim=1).values[:, None, None, None, :]
    mask = ((v - background).abs() > threshold).any(dim=-1).float()[:, None]  # (B, 1, F, H, W)
    size = 2 * ring + 1
    grown = torch.nn.functional.max_pool3d(mask, (1, size, size), stride=1, padding=(0, ring, ring))
    return grown[:, 0, ..., None] > 0


def check_foreground_codec(foreground_weight: float, codec: nn.Module) -> None:
    """A clear error at construction when a shape weight is asked for with a codec the mask cannot be laid out in."""
    if foreground_weight > 0 and not isinstance(codec, PixelCodec):
        raise ValueError(f"stage.foreground_weight={foreground_weight} needs the toy's pixel codec (the mask is "
                         f"drawn in pixels and laid out as its latents), got {type(codec).__name__}; set it to 0")


def foreground_weights(batch: dict[str, Any], codec: nn.Module, foreground_weight: float) -> torch.Tensor:
    """Per-latent loss weights `1 + foreground_weight * mask` of the batch's decoded videos (see `foreground_mask`)."""
    if "video" not in batch:
        raise ValueError("stage.foreground_weight needs decoded videos in the batch (data=toy / manifest), "
                         "not cached latents; set it to 0 with data=cache")
    mask = foreground_mask(batch["video"])
    latent_mask = codec.encode(mask.to(torch.uint8).mul(255).expand_as(batch["video"])) > 0
    return 1 + foreground_weight * latent_mask.float()

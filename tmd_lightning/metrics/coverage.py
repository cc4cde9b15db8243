"""Mode coverage on the toy world: how much of the data's spread of start positions and sizes samples keep.

Every toy caption fixes colour, shape and direction, but the data draws each video's start position and size at
random, so a generator that covers the caption's modes shows the same within-caption spread of (start x, start y,
size) as the data. Mode-seeking distillation (DMD without the t_dmd shift, docs/method.md §5) tends to shrink that
spread towards one "typical" video per caption; the ratio `std(samples) / std(data)` per quantity measures it
(1 = full coverage, 0 = one mode per caption). Standard deviations are pooled within captions, so the attributes
the caption fixes (direction moves the start, colour/shape do not) never count as spread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tmd_lightning.metrics.toy import foreground_weights

QUANTITIES = ("start_x", "start_y", "size")


def start_and_size(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3) float64: foreground centroid in the first frame (canvas units) and size.

    Size is the square root of the mean foreground area over frames, in canvas units (a width for a square).
    """
    w = foreground_weights(videos).double()
    _, _, h, wd = w.shape
    ys = ((torch.arange(h, dtype=w.dtype, device=w.device) + 0.5) / h).view(1, h, 1)  # pixel centres, as rendered
    xs = ((torch.arange(wd, dtype=w.dtype, device=w.device) + 0.5) / wd).view(1, 1, wd)
    first = w[:, 0]
    mass = first.sum(dim=(1, 2)).clamp_min(1e-6)
    cx = (first * xs).sum(dim=(1, 2)) / mass
    cy = (first * ys).sum(dim=(1, 2)) / mass
    size = (w.sum(dim=(2, 3)).mean(dim=1) / (h * wd)).sqrt()
    return torch.stack([cx, cy, size], dim=1)


def pooled_within_std(values: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """(B, K) values, a group label per row -> (K,) pooled within-group standard deviation.

    sqrt(sum over groups of sum of squared deviations from the group mean / (B - number of groups)): the usual
    pooled estimate, unbiased for equal true variances; groups with one row add nothing.
    """
    labels = list(groups)
    if len(labels) != values.shape[0]:
        raise ValueError(f"{values.shape[0]} rows but {len(labels)} group labels")
    names = sorted(set(labels))
    index = torch.tensor([names.index(g) for g in labels], device=values.device)
    ss = torch.zeros(values.shape[1], dtype=torch.float64, device=values.device)
    for k in range(len(names)):
        rows = values[index == k].double()
        ss += ((rows - rows.mean(dim=0)) ** 2).sum(dim=0)
    dof = values.shape[0] - len(names)
    if dof <= 0:
        raise ValueError("pooled spread needs at least one group with two or more rows")
    return (ss / dof).sqrt()


def mode_coverage(fake: torch.Tensor, fake_captions: Sequence[str], real: torch.Tensor,
                  real_captions: Sequence[str]) -> dict[str, float]:
    """Spread of start position and size in samples relative to the data, within captions (1 = data's spread).

    Returns `coverage_<quantity>` = pooled within-caption std of samples / of real videos for start_x, start_y and
    size, and `coverage` = their mean.
    """
    ratio = pooled_within_std(start_and_size(fake), fake_captions) / pooled_within_std(start_and_size(real),
                                                                                       real_captions)
    out = {f"coverage_{q}": float(r) for q, r in zip(QUANTITIES, ratio, strict=True)}
    out["coverage"] = float(ratio.mean())
    return out

"""Collapse diagnostics for generated videos: motion, seed diversity and colour saturation.

Distribution-matching distillation (DMD) can collapse without the loss showing it: students learn static videos
(motion near 0), ignore the noise seed (seeds of one prompt nearly identical, diversity near 0), or drift to
saturated or washed-out colours (saturation near 1 or 0). These cheap pixel statistics, compared with the
teacher's values on the same prompts, flag that early. All take uint8 videos (B, F, H, W, 3) and work in [0, 1].
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def _check_videos(videos: Tensor) -> Tensor:
    """Validate uint8 (B, F, H, W, 3) videos and return them as float in [0, 1]."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos (B, F, H, W, 3), got {tuple(videos.shape)} {videos.dtype}")
    return videos.float() / 255.0


def _reduce(values: Tensor, per_video: bool) -> Tensor:
    """(B,) per-video values, or their mean over videos."""
    return values if per_video else values.mean()


def motion_magnitude(videos: Tensor, per_video: bool = False) -> Tensor:
    """Mean absolute frame-to-frame change in [0, 1]: ``mean |x[t+1] - x[t]|`` over t, pixels and channels.

    0 for a static video. Returns a scalar (mean over videos) or, with ``per_video``, a (B,) tensor.
    """
    x = _check_videos(videos)
    if x.shape[1] < 2:
        raise ValueError(f"motion needs at least 2 frames, got {x.shape[1]}")
    return _reduce((x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3, 4)), per_video)


def colour_saturation(videos: Tensor, per_video: bool = False) -> Tensor:
    """Mean HSV saturation in [0, 1]: ``(max - min) / max`` over RGB per pixel, 0 where max is 0 (black).

    0 for grey videos, 1 for pure primaries. Returns a scalar or, with ``per_video``, a (B,) tensor.
    """
    x = _check_videos(videos)
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    return _reduce(sat.mean(dim=(1, 2, 3)), per_video)


def _groups(prompt_ids: Sequence[Hashable] | Tensor, n: int) -> list[list[int]]:
    """Indices of the videos of each prompt, for prompts with at least two videos, in first-seen order."""
    ids = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else list(prompt_ids)
    if len(ids) != n:
        raise ValueError(f"expected one prompt id per video ({n}), got {len(ids)}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, pid in enumerate(ids):
        groups[pid].append(i)
    return [idx for idx in groups.values() if len(idx) >= 2]


def _pairwise_mean_abs(x: Tensor) -> Tensor:
    """Mean over unordered pairs (i < j) of the mean absolute difference between videos x[i] and x[j]."""
    dists = [(x[i + 1 :] - x[i]).abs().flatten(1).mean(dim=1) for i in range(len(x) - 1)]
    return torch.cat(dists).mean()


def per_prompt_diversity(videos: Tensor, prompt_ids: Sequence[Hashable] | Tensor) -> Tensor:
    """(P,) seed diversity of each prompt that has >= 2 videos (see :func:`seed_diversity`); empty if none has."""
    x = _check_videos(videos)
    values = [_pairwise_mean_abs(x[idx]) for idx in _groups(prompt_ids, len(x))]
    return torch.stack(values) if values else x.new_zeros(0)


def seed_diversity(videos: Tensor, prompt_ids: Sequence[Hashable] | Tensor) -> Tensor:
    """Mean pairwise distance between videos of the same prompt (different seeds), averaged over prompts.

    Distance is the mean absolute pixel difference in [0, 1]; a prompt's value is the mean over its pairs; prompts
    with a single video are skipped. 0 when the seeds give identical videos (mode collapse).

    Raises:
        ValueError: if no prompt has two videos.
    """
    values = per_prompt_diversity(videos, prompt_ids)
    if values.numel() == 0:
        raise ValueError("seed diversity needs at least one prompt with two or more videos (different seeds)")
    return values.mean()


class CollapseDiagnostics(Metric):
    """Accumulates motion, seed diversity and saturation over a validation round; ``compute`` returns a dict.

    Motion and saturation are means over videos; diversity is the mean over prompts, with pairs formed within each
    ``update`` call (pass all seeds of a prompt together). ``diversity`` is NaN when no call had a prompt with two
    videos, or when no prompt ids were given. States are sums, reduced across ranks with ``sum``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    motion_sum: Tensor
    saturation_sum: Tensor
    n_videos: Tensor
    diversity_sum: Tensor
    n_prompts: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("motion_sum", "saturation_sum", "diversity_sum"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")
        for name in ("n_videos", "n_prompts"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: Tensor, prompt_ids: Sequence[Hashable] | Tensor | None = None) -> None:
        """Add uint8 videos (B, F, H, W, 3); ``prompt_ids`` (one per video) groups the seeds of each prompt."""
        self.motion_sum += motion_magnitude(videos, per_video=True).sum()
        self.saturation_sum += colour_saturation(videos, per_video=True).sum()
        self.n_videos += videos.shape[0]
        if prompt_ids is not None:
            diversity = per_prompt_diversity(videos, prompt_ids)
            self.diversity_sum += diversity.sum()
            self.n_prompts += diversity.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"motion", "diversity", "saturation"}`` as float scalar tensors."""
        diversity = self.diversity_sum / self.n_prompts if self.n_prompts > 0 else torch.tensor(float("nan"))
        return {
            "motion": self.motion_sum / self.n_videos,
            "diversity": diversity.to(self.motion_sum.device),
            "saturation": self.saturation_sum / self.n_videos,
        }

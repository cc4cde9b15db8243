"""Sample videos as real TensorBoard video summaries: one padded grid per evaluation, with a legend.

TensorBoard's `add_video` needs moviepy < 2 and otherwise logs nothing without raising; this checks the import
itself and says so instead of failing silently. The videos are tiled here (not by `add_video`, which butts them
together): nearest-upscaled to `min_side` px (the toy's 16 px clips are hard to see), or, when larger than `max_side`
px on the long side (Wan's 480 x 832), area-downscaled to it (eight 81-frame 480p videos would be a GIF of hundreds of
MB in the event file), a `pad` px light border around and between them, `columns` per row; a text summary
`<tag>/legend` says which prompt and seed each row and column shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning as L
import torch

log = logging.getLogger(__name__)

BORDER = 224  # light grey between the (mostly dark) toy videos
MAX_SIDE = 128  # long side (px) a larger video is downscaled to before it goes into the grid


def fit_size(videos: torch.Tensor, min_side: int = 64, max_side: int = MAX_SIDE) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 videos at a size worth logging: area-downscaled (aspect kept) to `max_side` px on the
    long side when larger, else nearest-upscaled by a whole factor to at least `min_side` px on the short side."""
    n, f, h, w, c = videos.shape
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        frames = videos.reshape(n * f, h, w, c).permute(0, 3, 1, 2).float()
        small = torch.nn.functional.interpolate(frames, size=size, mode="area")
        return small.round().clamp(0, 255).to(videos.dtype).permute(0, 2, 3, 1).reshape(n, f, *size, c)
    factor = max(1, math.ceil(min_side / max(1, min(h, w))))
    if factor > 1:
        videos = videos.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return videos


def video_grid(videos: torch.Tensor, columns: int = 4, pad: int = 2, min_side: int = 64,
               max_side: int = MAX_SIDE) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 videos as one (F, H', W', 3) grid: `columns` per row, each brought to a loggable size
    (`fit_size`: at most `max_side` px on the long side, at least `min_side` on the short one), `pad` px of border
    around every video."""
    videos = fit_size(videos, min_side, max_side)
    n, f, h, w, c = videos.shape
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    grid = torch.full((f, pad + rows * (h + pad), pad + cols * (w + pad), c), BORDER, dtype=videos.dtype)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, y : y + h, x : x + w] = videos[i]
    return grid


def legend(labels: Sequence[str], columns: int) -> str:
    """A Markdown table: row, column and label (prompt, seed) of every video in the grid."""
    cols = max(1, min(columns, len(labels)))
    lines = ["| row | column | video |", "|---:|---:|---|"]
    lines += [f"| {i // cols + 1} | {i % cols + 1} | {label.replace('|', '/')} |" for i, label in enumerate(labels)]
    return "\n".join(lines)


def log_videos(trainer: L.Trainer, tag: str, videos: torch.Tensor, step: int, fps: int = 8,
               labels: Sequence[str] | None = None, columns: int = 4, pad: int = 2, min_side: int = 64,
               max_side: int = MAX_SIDE) -> bool:
    """Writes (N, F, H, W, 3) uint8 videos as one padded grid (see `video_grid`) to every TensorBoard logger, and
    `labels` (one per video) as the text summary `<tag>/legend`; returns whether any was written."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"log_videos: {len(labels)} labels for {len(videos)} videos")
    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            try:
                import moviepy.editor  # noqa: F401  (add_video's encoder; moviepy >= 2 removed this module)
            except ImportError as exc:
                raise RuntimeError("TensorBoard video summaries need moviepy<2 (pip install 'moviepy<2')") from exc
            grid = video_grid(videos, columns, pad, min_side, max_side)
            logger.experiment.add_video(tag, grid.permute(0, 3, 1, 2).unsqueeze(0).contiguous(), global_step=step,
                                        fps=fps)
            if labels is not None:
                logger.experiment.add_text(f"{tag}/legend", legend(labels, columns), global_step=step)
            logger.experiment.flush()
            written = True
    return written

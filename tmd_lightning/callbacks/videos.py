"""Sample videos as real TensorBoard video summaries.

TensorBoard's `add_video` needs moviepy < 2 and otherwise logs nothing without raising; this checks the import
itself and says so instead of failing silently.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


def log_videos(trainer: L.Trainer, tag: str, videos: torch.Tensor, step: int, fps: int = 8) -> bool:
    """Writes (N, F, H, W, 3) uint8 videos to every TensorBoard logger; returns whether any was written."""
    from lightning.pytorch.loggers import TensorBoardLogger

    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            try:
                import moviepy.editor  # noqa: F401  (add_video's encoder; moviepy >= 2 removed this module)
            except ImportError as exc:
                raise RuntimeError("TensorBoard video summaries need moviepy<2 (pip install 'moviepy<2')") from exc
            logger.experiment.add_video(tag, videos.permute(0, 1, 4, 2, 3).contiguous(), global_step=step, fps=fps)
            logger.experiment.flush()
            written = True
    return written

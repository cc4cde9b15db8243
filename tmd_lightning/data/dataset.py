"""A dataset of text-video pairs read through a manifest and a video backend, with counted skips."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tmd_lightning.data.backends import VideoDecodeError, get_backend
from tmd_lightning.data.manifest import ManifestEntry

log = logging.getLogger(__name__)


@dataclass
class SkipRecord:
    path: str
    reason: str


@dataclass
class SkipCounter:
    """Counts skipped samples; the DataModule raises once their share exceeds `max_fraction`.

    `empty_batches` counts batches that had no usable sample at all (every item skipped, e.g. one corrupt file at
    batch size 1): the stages skip those steps.
    """

    max_fraction: float = 0.05
    min_seen: int = 32
    seen: int = 0
    skipped: list[SkipRecord] = field(default_factory=list)
    epoch_skipped: int = 0
    empty_batches: int = 0

    def update(self, seen: int, skipped: list[SkipRecord], empty_batch: bool = False) -> None:
        self.seen += seen
        self.skipped.extend(skipped)
        self.epoch_skipped += len(skipped)
        for rec in skipped:
            log.warning("skipped %s: %s", rec.path, rec.reason)
        self.check()
        if empty_batch:
            self.empty_batches += 1
            log.warning("a batch of %d item(s) has no usable sample: its step is skipped (%d such batch(es) so far)",
                        seen, self.empty_batches)

    def check(self) -> None:
        if self.seen >= self.min_seen and len(self.skipped) > self.max_fraction * self.seen:
            names = "\n  ".join(f"{r.path}: {r.reason}" for r in self.skipped[:50])
            raise RuntimeError(
                f"{len(self.skipped)} of {self.seen} samples could not be used "
                f"(more than data.max_skip_fraction={self.max_fraction}):\n  {names}"
            )


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, height, width, 3) uint8: scale the short side, then centre-crop."""
    f, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class VideoTextDataset(Dataset):
    """Yields {"video": (F, H, W, 3) uint8, "caption": str} or {"skip": SkipRecord} for unusable files.

    `random_start` picks a random clip start (training); otherwise clips start at frame 0.
    """

    def __init__(
        self,
        entries: list[ManifestEntry],
        num_frames: int,
        height: int,
        width: int,
        backend: str = "auto",
        frame_stride: int = 1,
        random_start: bool = False,
        cache_decoded: bool = False,
    ) -> None:
        self.entries = entries
        self.num_frames, self.height, self.width = num_frames, height, width
        self.backend_name, self.backend = backend, get_backend(backend)
        self.frame_stride, self.random_start = frame_stride, random_start
        self.cache: dict[int, torch.Tensor] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, index: int) -> torch.Tensor:
        entry = self.entries[index]
        span = (self.num_frames - 1) * self.frame_stride + 1
        start = 0
        if self.random_start and entry.num_frames and entry.num_frames > span:
            start = random.randint(0, entry.num_frames - span)
        frames = self.backend.read(entry.path, span, start)[:: self.frame_stride]
        return resize_center_crop(torch.from_numpy(np.ascontiguousarray(frames)), self.height, self.width)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        if not entry.caption.strip():
            return {"skip": SkipRecord(str(entry.path), "empty caption")}
        try:
            if self.cache is not None and index in self.cache:
                video = self.cache[index]
            else:
                video = self._load(index)
                if self.cache is not None:
                    self.cache[index] = video
        except VideoDecodeError as exc:
            return {"skip": SkipRecord(str(entry.path), str(exc))}
        return {"video": video, "caption": entry.caption}


def collate_videos(items: list[dict]) -> dict:
    """Stacks usable items; carries the skip records along so the main process can count them."""
    good = [it for it in items if "skip" not in it]
    batch = {
        "video": torch.stack([it["video"] for it in good]) if good else torch.empty(0, dtype=torch.uint8),
        "caption": [it["caption"] for it in good],
        "skipped": [it["skip"] for it in items if "skip" in it],
        "num_items": len(items),
    }
    return batch

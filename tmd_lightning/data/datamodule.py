"""The LightningDataModule: manifest -> decoded clips -> batches of uint8 videos and captions (docs/method.md §7)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from tmd_lightning.data.dataset import SkipCounter, SkipRecord, VideoTextDataset, collate_videos
from tmd_lightning.data.manifest import ManifestError, read_manifest
from tmd_lightning.data.toy_world import generate_toy_dataset

log = logging.getLogger(__name__)


class VideoTextDataModule(L.LightningDataModule):
    """Reads any manifest (or writes the toy world first) and serves text-video batches.

    Args:
        train_manifest / val_manifest: CSV or JSONL manifests; ignored for a split that `toy` generates.
        toy: if given, parameters for `generate_toy_dataset` (root, videos_per_caption, ...); the toy world is
            written on first use and reused afterwards.
        num_frames, height, width: the clip every sample is decoded to (frames 4k+1 for Wan).
        max_skip_fraction: share of unusable samples above which the run stops with an error naming them.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        toy: dict[str, Any] | None = None,
        num_frames: int = 9,
        height: int = 16,
        width: int = 16,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        backend: str = "auto",
        frame_stride: int = 1,
        cache_decoded: bool = False,
        max_skip_fraction: float = 0.05,
        spatial_multiple: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if (num_frames - 1) % 4 != 0:
            raise ValueError(f"data.num_frames={num_frames} must be 4k+1 (Wan's temporal compression)")
        if height % spatial_multiple or width % spatial_multiple:
            raise ValueError(f"data size {height}x{width} must be divisible by {spatial_multiple}")
        if train_manifest is None and toy is None:
            raise ValueError("give data.train_manifest or data.toy")
        self.skips = SkipCounter(max_fraction=max_skip_fraction)
        self.train_set: VideoTextDataset | None = None
        self.val_set: VideoTextDataset | None = None

    def prepare_data(self) -> None:
        toy = self.hparams.toy
        if toy is not None:
            common = dict(num_frames=self.hparams.num_frames, size=self.hparams.height)
            generate_toy_dataset(toy["root"], toy.get("videos_per_caption", 96), seed=toy.get("seed", 0),
                                 split="train", **common)
            generate_toy_dataset(toy["root"], toy.get("val_videos_per_caption", 4),
                                 seed=toy.get("seed", 0) + 1, split="val", **common)

    def _manifests(self) -> tuple[Path, Path | None]:
        toy = self.hparams.toy
        if toy is not None:
            return Path(toy["root"]) / "train" / "manifest.csv", Path(toy["root"]) / "val" / "manifest.csv"
        val = self.hparams.val_manifest
        return Path(self.hparams.train_manifest), Path(val) if val else None

    def _dataset(self, manifest: Path, train: bool) -> VideoTextDataset:
        entries = read_manifest(manifest)
        missing = [SkipRecord(str(e.path), "file not found") for e in entries if not e.path.is_file()]
        empty = [SkipRecord(str(e.path), "empty caption") for e in entries
                 if e.path.is_file() and not e.caption.strip()]  # a missing file is counted once, above
        bad = missing + empty
        if bad:
            log.warning("%s: %d of %d entries unusable (%d missing, %d empty captions)", manifest, len(bad),
                        len(entries), len(missing), len(empty))
            if len(bad) > self.hparams.max_skip_fraction * len(entries):
                names = "\n  ".join(f"{r.path}: {r.reason}" for r in bad[:50])
                raise ManifestError(f"{manifest}: {len(bad)} of {len(entries)} entries unusable "
                                    f"(more than data.max_skip_fraction={self.hparams.max_skip_fraction}):\n  {names}")
            # filter rows, not paths: another row may use the same video with a usable caption
            entries = [e for e in entries if e.path.is_file() and e.caption.strip()]
            self.skips.skipped.extend(bad)
            self.skips.seen += len(bad)
        h = self.hparams
        return VideoTextDataset(entries, h.num_frames, h.height, h.width, h.backend, h.frame_stride,
                                random_start=train, cache_decoded=h.cache_decoded)

    def split_dataset(self, split: str) -> VideoTextDataset | None:
        """The "train" or "val" split with every clip from frame 0 (what a cache stores), unusable rows counted in
        `skips` as in `setup`; None for a split without a manifest. Call `prepare_data` first for the toy."""
        train, val = self._manifests()
        manifest = {"train": train, "val": val}[split]
        return None if manifest is None else self._dataset(manifest, train=False)

    def setup(self, stage: str | None = None) -> None:
        train, val = self._manifests()
        if self.train_set is None:
            self.train_set = self._dataset(train, train=True)
        if self.val_set is None and val is not None:
            self.val_set = self._dataset(val, train=False)

    def _loader(self, dataset: VideoTextDataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          collate_fn=collate_videos, drop_last=shuffle and len(dataset) >= batch_size,
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Counts the skips of every batch in the main process and stops the run if there are too many; a batch left
        without any sample is counted too (the stage skips its step)."""
        num_items = batch.pop("num_items", 0)
        self.skips.update(num_items, batch.pop("skipped", []), empty_batch=num_items > 0 and not batch["caption"])
        return batch

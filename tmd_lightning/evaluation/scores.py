"""Scores of sampled videos, computed one way for `sample`, `evaluate`, the sampling callbacks and the toy study.

Toy world: per-attribute and joint accuracy from the analytic classifiers, the direction probe, and toy-FD against
held-out real toy videos (`ToyReference`). Real data: FVD against a fixed set of real videos, embedded once and kept
through every `reset` (`FrechetVideoDistance(reset_real_features=False)`), and CLIP score. Every evaluation also
gets the collapse diagnostics (motion, saturation, seed diversity). Every function scores all the videos it is given
in this process (a distributed caller gathers them on one rank first), so no metric syncs across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from tmd_lightning.data.backends import get_backend
from tmd_lightning.data.manifest import ManifestEntry, read_manifest
from tmd_lightning.data.toy_world import generate_toy_dataset
from tmd_lightning.metrics.diagnostics import colour_saturation, motion_magnitude, seed_diversity
from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.fvd import FrechetVideoDistance, I3DFeatures
from tmd_lightning.metrics.toy import ToyAccuracy, direction_confusion, toy_features

if TYPE_CHECKING:
    from tmd_lightning.metrics.clip_score import VideoCLIPScore

FVD_READ_BATCH = 16  # real videos decoded and embedded per FVD update


def read_videos(entries: Sequence[ManifestEntry], num_frames: int) -> torch.Tensor:
    """The uint8 videos (B, F, H, W, 3) of manifest entries, `num_frames` frames each."""
    backend = get_backend("auto")
    return torch.stack([torch.from_numpy(backend.read(e.path, num_frames)) for e in entries])


def read_video_batches(entries: Sequence[ManifestEntry], num_frames: int,
                       batch_size: int = FVD_READ_BATCH) -> Iterator[torch.Tensor]:
    """The videos of manifest entries, `batch_size` at a time (a large reference never sits in memory whole)."""
    for i in range(0, len(entries), batch_size):
        yield read_videos(entries[i : i + batch_size], num_frames)


# -- toy world -----------------------------------------------------------------------------------------------------


def toy_stats(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the videos' toy features (`metrics.toy.toy_features`): one side of toy-FD."""
    return gaussian_stats(toy_features(videos))


@dataclass
class ToyReference:
    """The held-out real toy videos toy-FD (and the study's mode coverage) compare with, read and summarised once."""

    captions: list[str]
    videos: torch.Tensor
    stats: tuple[torch.Tensor, torch.Tensor]  # toy-feature mean and covariance

    @classmethod
    def load(cls, manifest: str | Path, num_frames: int) -> ToyReference:
        """The videos of a manifest, `num_frames` frames each."""
        entries = read_manifest(manifest)
        videos = read_videos(entries, num_frames)
        return cls([e.caption for e in entries], videos, toy_stats(videos))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ToyReference | None:
        """The reference a `sample` / `evaluate` config names (`toy_reference`: root, videos_per_caption, seed),
        rendered on first use and reused after; None when the config has none."""
        ref = cfg.get("toy_reference")
        if not ref:
            return None
        manifest = generate_toy_dataset(ref.root, ref.videos_per_caption, cfg.num_frames, cfg.height, seed=ref.seed,
                                        split="reference")
        return cls.load(manifest, cfg.num_frames)


def toy_accuracy(videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """`acc_<attribute>` for colour, shape, direction, joint, axis and sign (`metrics.toy.ToyAccuracy`)."""
    accuracy = ToyAccuracy(sync_on_compute=False)
    accuracy.update(videos, captions)
    return {f"acc_{k}": float(v) for k, v in accuracy.compute().items()}


def toy_fd(videos: torch.Tensor, real_stats: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Toy-FD: the Fréchet distance between the videos' toy features and the real side's (`toy_stats`)."""
    return float(frechet_distance(*toy_stats(videos), *real_stats))


def toy_report(videos: torch.Tensor, captions: list[str], reference: ToyReference | None) -> dict[str, Any]:
    """Per-attribute and joint toy accuracy, the direction probe (`metrics.toy.direction_confusion`), and toy-FD
    against `reference` with the number of real videos it holds (none without a reference)."""
    report: dict[str, Any] = toy_accuracy(videos, captions)
    report["direction_probe"] = direction_confusion(videos, captions)
    if reference is not None:
        report["toy_fd"] = toy_fd(videos, reference.stats)
        report["toy_fd_real_count"] = len(reference.captions)
    return report


# -- real data: FVD and CLIP score ---------------------------------------------------------------------------------


def reference_fvd(detector: str | Path, manifest: str | Path, num_frames: int, num_real: int = 2048,
                  **kwargs: Any) -> FrechetVideoDistance:
    """FVD (StyleGAN-V I3D at `detector`) holding the first `num_real` videos of `manifest` as its real side, which
    `reset` keeps: `score_fvd` then adds only generated videos."""
    metric = FrechetVideoDistance(I3DFeatures(detector), reset_real_features=False, **kwargs)
    for batch in read_video_batches(read_manifest(manifest)[:num_real], num_frames):
        metric.update(batch, real=True)
    return metric


def score_fvd(metric: FrechetVideoDistance, videos: torch.Tensor) -> dict[str, float | int]:
    """FVD of generated videos against the real side the metric keeps (`reset_real_features=False`), with both
    sample counts (FVDs from different counts are not comparable)."""
    if metric.reset_real_features:
        raise ValueError("score_fvd needs FrechetVideoDistance(reset_real_features=False): its reset would drop the "
                         "real side")
    metric.reset()
    metric.update(videos, real=False)
    return {"fvd": float(metric.compute()), "fvd_num_real": metric.num_real, "fvd_num_fake": metric.num_fake}


def score_clip(metric: VideoCLIPScore, videos: torch.Tensor, captions: list[str]) -> float:
    """Mean CLIP score of the videos against their captions (the metric starts empty)."""
    metric.reset()
    metric.update(videos, captions)
    return float(metric.compute())


def video_scores(videos: torch.Tensor, captions: list[str], fvd: FrechetVideoDistance | None = None,
                 clip: VideoCLIPScore | None = None) -> dict[str, float | int]:
    """FVD (`fvd`, `fvd_num_real`, `fvd_num_fake`) and `clip_score`, each when its metric is given."""
    out: dict[str, float | int] = {}
    if fvd is not None:
        out |= score_fvd(fvd, videos)
    if clip is not None:
        out["clip_score"] = score_clip(clip, videos, captions)
    return out


@dataclass
class Scorer:
    """The quality side of an evaluation row: toy accuracy, the direction probe and toy-FD (`toy`, toy-FD with a
    `reference`), FVD against the real videos `fvd` keeps and CLIP score, each where configured."""

    toy: bool = True
    reference: ToyReference | None = None
    fvd: FrechetVideoDistance | None = None
    clip: VideoCLIPScore | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Scorer:
        """An `evaluate` config's scores: toy metrics unless `toy_metrics=false` (toy-FD against `toy_reference`),
        FVD when `fvd.detector` is set (against the first `fvd.num_real` videos of `fvd.reference`), CLIP score when
        `clip.path` is set. Detector and CLIP come from local files; nothing downloads."""
        fvd = clip = None
        if cfg.get("fvd") and cfg.fvd.get("detector"):
            if not cfg.fvd.get("reference"):
                raise ValueError("fvd.detector is set: also set fvd.reference, a manifest of real videos")
            fvd = reference_fvd(cfg.fvd.detector, cfg.fvd.reference, cfg.num_frames, cfg.fvd.get("num_real", 2048))
        if cfg.get("clip") and cfg.clip.get("path"):
            from tmd_lightning.metrics.clip_score import VideoCLIPScore

            clip = VideoCLIPScore(cfg.clip.path)
        toy = cfg.get("toy_metrics", True)
        return cls(toy, ToyReference.from_config(cfg) if toy else None, fvd, clip)

    def __call__(self, videos: torch.Tensor, captions: list[str]) -> dict[str, Any]:
        """The toy report (when `toy`), then FVD and CLIP score (when configured)."""
        report = toy_report(videos, captions, self.reference) if self.toy else {}
        return report | video_scores(videos, captions, self.fvd, self.clip)


# -- collapse diagnostics ------------------------------------------------------------------------------------------


def diagnostics(videos: torch.Tensor, prompt_ids: list[Any]) -> dict[str, float]:
    """Motion, saturation and (when some prompt has two videos) seed diversity of uint8 videos."""
    out = {"motion": float(motion_magnitude(videos)), "saturation": float(colour_saturation(videos))}
    if len(set(prompt_ids)) < len(prompt_ids):
        out["diversity"] = float(seed_diversity(videos, prompt_ids))
    return out

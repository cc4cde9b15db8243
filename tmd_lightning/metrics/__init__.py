"""Metrics (torchmetrics-style): Fréchet distance and FVD, CLIP score, collapse diagnostics, toy accuracy/features."""

from tmd_lightning.metrics.clip_score import ClipFeatures, VideoCLIPScore, load_local_clip
from tmd_lightning.metrics.diagnostics import (
    CollapseDiagnostics,
    colour_saturation,
    motion_magnitude,
    per_prompt_diversity,
    seed_diversity,
)
from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.fvd import (
    FrechetVideoDistance,
    I3DFeatures,
    VideoFeatureExtractor,
    load_i3d_detector,
    preprocess_i3d,
)
from tmd_lightning.metrics.toy import ATTRIBUTES, ToyAccuracy, classify, toy_features

__all__ = [
    "ATTRIBUTES",
    "ClipFeatures",
    "CollapseDiagnostics",
    "FrechetVideoDistance",
    "I3DFeatures",
    "ToyAccuracy",
    "VideoCLIPScore",
    "VideoFeatureExtractor",
    "classify",
    "colour_saturation",
    "frechet_distance",
    "gaussian_stats",
    "load_i3d_detector",
    "load_local_clip",
    "motion_magnitude",
    "per_prompt_diversity",
    "preprocess_i3d",
    "seed_diversity",
    "toy_features",
]

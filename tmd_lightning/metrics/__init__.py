"""Metrics (torchmetrics-style): Fréchet distance, toy-world accuracy and features."""

from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.fvd import (
    FrechetVideoDistance,
    I3DFeatures,
    ToyFeatures,
    VideoFeatureExtractor,
    load_i3d_detector,
    preprocess_i3d,
)
from tmd_lightning.metrics.toy import ATTRIBUTES, ToyAccuracy, classify, toy_features

__all__ = [
    "ATTRIBUTES",
    "FrechetVideoDistance",
    "I3DFeatures",
    "ToyAccuracy",
    "ToyFeatures",
    "VideoFeatureExtractor",
    "classify",
    "frechet_distance",
    "gaussian_stats",
    "load_i3d_detector",
    "preprocess_i3d",
    "toy_features",
]

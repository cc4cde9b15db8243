"""Metrics (torchmetrics-style): Fréchet distance, toy-world accuracy and features."""

from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.toy import ATTRIBUTES, ToyAccuracy, classify, toy_features

__all__ = ["ATTRIBUTES", "ToyAccuracy", "classify", "frechet_distance", "gaussian_stats", "toy_features"]

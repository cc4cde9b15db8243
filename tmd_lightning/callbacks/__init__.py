"""Callbacks: checkpoints, the NaN guard, EMA of the trained network, export, sampling evaluation, video logging."""

from tmd_lightning.callbacks.checkpoint import FinalStateCheckpoint
from tmd_lightning.callbacks.console import ParameterSummary, StepProgressBar
from tmd_lightning.callbacks.data_health import SkippedSamplesLogger
from tmd_lightning.callbacks.ema import EMA, find_ema
from tmd_lightning.callbacks.export import ExportPretrained
from tmd_lightning.callbacks.finite import FiniteGuard
from tmd_lightning.callbacks.sampling_eval import SamplingEvalCallback
from tmd_lightning.callbacks.toy_eval import ToyEvalCallback
from tmd_lightning.callbacks.video_eval import VideoEvalCallback
from tmd_lightning.callbacks.videos import log_videos

__all__ = ["EMA", "ExportPretrained", "FinalStateCheckpoint", "FiniteGuard", "ParameterSummary",
           "SamplingEvalCallback", "SkippedSamplesLogger", "StepProgressBar", "ToyEvalCallback",
           "VideoEvalCallback", "find_ema", "log_videos"]

"""The LightningModules: one per training stage."""

from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.teacher import TeacherStage

__all__ = ["TeacherStage", "VideoStage"]

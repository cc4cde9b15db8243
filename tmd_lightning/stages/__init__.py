"""The LightningModules: one per training stage."""

from tmd_lightning.stages.adapt_head import AdaptHeadStage
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.student import StudentStage
from tmd_lightning.stages.teacher import TeacherStage

__all__ = ["AdaptHeadStage", "StudentStage", "TeacherStage", "VideoStage"]

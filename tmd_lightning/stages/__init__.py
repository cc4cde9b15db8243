"""The LightningModules: one per training stage."""

from tmd_lightning.stages.adapt_head import AdaptHeadStage
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.distill import DistillStage, DMD2Stage, TMDDistillStage
from tmd_lightning.stages.kd_warmup import KDWarmupStage
from tmd_lightning.stages.student import FewStepWanStage, StudentStage
from tmd_lightning.stages.teacher import TeacherStage

__all__ = ["AdaptHeadStage", "DMD2Stage", "DistillStage", "FewStepWanStage", "KDWarmupStage", "StudentStage",
           "TMDDistillStage", "TeacherStage", "VideoStage"]

"""The LightningModules: one per training stage, and the sampling-only stage a checkpoint or export loads as."""

from tmd_lightning.stages.adapt_head import AdaptHeadStage
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.distill import DistillStage, DMD2Stage, TMDDistillStage
from tmd_lightning.stages.kd_warmup import KDWarmupStage
from tmd_lightning.stages.sampling_stage import SamplingStage
from tmd_lightning.stages.teacher import TeacherStage

__all__ = ["AdaptHeadStage", "DMD2Stage", "DistillStage", "KDWarmupStage", "SamplingStage", "TMDDistillStage",
           "TeacherStage", "VideoStage"]

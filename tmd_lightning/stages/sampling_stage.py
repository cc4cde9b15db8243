"""A trained network with its sampler, for sampling only: what `sample`, `evaluate`, the study and the notebook load
from a checkpoint or an exported folder (`tmd_lightning.checkpoints`)."""

from __future__ import annotations

from torch import nn

from tmd_lightning.sampling import Sampler
from tmd_lightning.stages.base import VideoStage


class SamplingStage(VideoStage):
    """`network` (a Wan teacher, a `TMDTransformer` or a distilled Wan student) sampled with `sampler`; no training
    state, no teacher or critics.

    Args:
        network: the network to sample.
        sampler: how it is sampled (`sampling.TeacherSampler`, `TMDSampler`, `FewStepSampler`).
    """

    network_attr = "net"

    def __init__(self, network: nn.Module, codec: nn.Module, text_encoder: nn.Module, sampler: Sampler,
                 negative_prompt: str = "") -> None:
        super().__init__(codec, text_encoder, negative_prompt)
        self.net = network
        self.sampler = sampler

"""What the TMD stages share: the student, its grids (§2) and its sampler (Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tmd_lightning.sampling import effective_nfe, student_grids, tmd_sample
from tmd_lightning.stages.base import VideoStage


class StudentStage(VideoStage):
    """Base of Stage 1 (adapt_head) and Stage 2 (distill): holds the `TMDTransformer` and samples with it.

    Args:
        student: the `TMDTransformer`.
        M: outer transition steps; N: inner flow-head steps (training grids and sampler defaults).
        grid_gamma: shift of both student grids (10); t_max: their last point (0.999, as Wan was pretrained).
    """

    network_attr = "student"

    def __init__(self, student: nn.Module, codec: nn.Module, text_encoder: nn.Module, negative_prompt: str = "",
                 M: int = 2, N: int = 2, grid_gamma: float = 10.0, t_max: float = 0.999) -> None:
        super().__init__(codec, text_encoder, negative_prompt)
        self.student = student
        self.M, self.N, self.grid_gamma, self.t_max = M, N, grid_gamma, t_max
        self.sampler_defaults = dict(M=M, N=N, gamma=grid_gamma, t_max=t_max)
        outer, inner = student_grids(M, N, grid_gamma, t_max)
        self.register_buffer("outer_grid", outer.float(), persistent=False)
        self.register_buffer("inner_grid", inner.float(), persistent=False)

    def sample_latents(self, noise: torch.Tensor, text: torch.Tensor, seeds: list[int] | None = None,
                       **sampler: Any) -> torch.Tensor:
        """Algorithm 1 with M, N chosen at sampling time; the inner noise of each outer step comes from `seeds`."""
        opts = self.sampler_options(**sampler)
        inner_noise = None
        if seeds is not None:
            inner_noise = [self.initial_noise(seeds, tuple(noise.shape[1:]), stream=i) for i in range(1, opts["M"] + 1)]
        return tmd_sample(self.student, noise, text, opts["M"], opts["N"], opts["gamma"], opts["t_max"],
                          inner_noise=inner_noise)

    def sampler_nfe(self, **sampler: Any) -> float:
        opts = self.sampler_options(**sampler)
        return effective_nfe(opts["M"], opts["N"], self.student.head_blocks, self.student.num_layers)

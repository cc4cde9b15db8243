"""What the TMD stages share: the student, its grids (docs/method.md §2) and its sampler (Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tmd_lightning.models.wan_parts import wan_velocity
from tmd_lightning.sampling import dmd2_sample, effective_nfe, student_grids, time_grid, tmd_sample
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
        return student_latents(self, noise, text, seeds, self.sampler_options(**sampler))

    def sampler_nfe(self, **sampler: Any) -> float:
        return student_nfe(self.student, self.sampler_options(**sampler))


def student_latents(stage: VideoStage, noise: torch.Tensor, text: torch.Tensor, seeds: list[int] | None,
                    opts: dict[str, Any]) -> torch.Tensor:
    """Algorithm 1 for `stage.student`; each outer step's inner noise comes from the seeds' noise streams."""
    inner_noise = None
    if seeds is not None:
        inner_noise = [stage.initial_noise(seeds, tuple(noise.shape[1:]), stream=i) for i in range(1, opts["M"] + 1)]
    return tmd_sample(stage.student, noise, text, opts["M"], opts["N"], opts["gamma"], opts["t_max"],
                      inner_noise=inner_noise)


def student_nfe(student: nn.Module, opts: dict[str, Any]) -> float:
    return effective_nfe(opts["M"], opts["N"], student.head_blocks, student.num_layers)


class FewStepWanStage(VideoStage):
    """A distilled full Wan model (the DMD2-v student) with DMD2-v's deterministic M-step sampler (docs/method.md §5).

    Args:
        student: the `WanTransformer3DModel`.
        M: sampler steps; grid_gamma: the student grid's shift (10 for 2 steps, 5 for 3-4); t_max: its last point.
    """

    network_attr = "student"

    def __init__(self, student: nn.Module, codec: nn.Module, text_encoder: nn.Module, negative_prompt: str = "",
                 M: int = 2, grid_gamma: float = 10.0, t_max: float = 0.999) -> None:
        super().__init__(codec, text_encoder, negative_prompt)
        self.student = student
        self.sampler_defaults = dict(M=M, gamma=grid_gamma, t_max=t_max)

    def sample_latents(self, noise: torch.Tensor, text: torch.Tensor, seeds: list[int] | None = None,
                       **sampler: Any) -> torch.Tensor:
        opts = self.sampler_options(**sampler)
        return few_step_wan_sample(self.student, noise, text, opts["M"], opts["gamma"], opts["t_max"])

    def sampler_nfe(self, **sampler: Any) -> float:
        return effective_nfe(self.sampler_options(**sampler)["M"])


def few_step_wan_sample(student: nn.Module, noise: torch.Tensor, text: torch.Tensor, M: int, gamma: float,
                        t_max: float) -> torch.Tensor:
    """`dmd2_sample` with a Wan transformer as the velocity model (timestep 1000 t), weights in any dtype."""
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return wan_velocity(student, x, t, text)

    return dmd2_sample(velocity, noise, time_grid(M, gamma, t_max))  # a host grid: no copy, no sync

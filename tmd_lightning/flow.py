"""The flow the whole method is written in (docs/method.md §1): rectified flow with t = 1 as noise,
`x_t = (1 - t) x + t ε`, velocity `v = ε - x`, so `x = x_t - t v`. Time grids and the time shift live here too.

One home for these formulas: stages, samplers, losses and models call them instead of retyping them. Wan itself is
called with timestep `1000 t` (`models.wan_parts.wan_velocity`).
"""

from __future__ import annotations

import torch


def rows(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """A per-sample value (B,) shaped to broadcast over a batch `like` (B, ...): (B, 1, 1, 1, 1) for video latents."""
    return t.view(-1, *([1] * ((like.dim() if like is not None else 5) - 1)))


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 - t) x + t ε`, t per sample (B,)."""
    r = rows(t, x)
    return (1 - r) * x + r * eps


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The clean sample a velocity points to: `x = x_t - t v`, t per sample (B,)."""
    return x_t - rows(t, x_t) * v


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target `v = ε - x`."""
    return eps - x


def shift(u: torch.Tensor | float, gamma: float) -> torch.Tensor | float:
    """Time shift `gamma u / ((gamma - 1) u + 1)`; gamma >= 1 pushes mass toward noise (t = 1)."""
    return gamma * u / ((gamma - 1) * u + 1)


def time_grid(steps: int, gamma: float = 1.0, t_max: float = 1.0) -> torch.Tensor:
    """`steps + 1` increasing times `shift(k / steps, gamma)`, k = 0..steps, with the last replaced by `t_max`.

    Student grids use gamma = 10 and t_max = 0.999 (Wan's pretraining never saw t = 1); the teacher's Euler
    sampler starts from pure noise, t_max = 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = shift(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), gamma)
    grid[-1] = t_max
    return grid

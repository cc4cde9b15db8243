"""Time grids, effective NFE and samplers (docs/method.md §2).

Convention: rectified flow with t = 1 as noise, `x_t = (1 - t) x + t eps`, velocity `v = eps - x`; Wan is called
with timestep `1000 t`.

The sampling loops make no host-device synchronisation of their own: grids are built on the host and read as Python
floats once per call (`_times`), per-step times reach the device as `torch.full` fills, and the inner grid of the TMD
sampler is moved to the device once per call. (diffusers' UniPC scheduler looks its step index up itself.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> v


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


def _times(grid: torch.Tensor | Sequence[float]) -> list[float]:
    """A grid as Python floats, read once per sampling call (one copy for a device tensor; none for a host one)."""
    return grid.tolist() if isinstance(grid, torch.Tensor) else [float(t) for t in grid]


def effective_nfe(M: int, N: int = 1, H: int = 0, L: int = 1, cfg: bool = False) -> float:
    """DiT blocks executed per video / L: `M (1 + (N - 1) H / L)`; doubled for classifier-free guidance."""
    nfe = M * (1 + (N - 1) * H / L)
    return 2 * nfe if cfg else nfe


def cfg_velocity(model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 cond: torch.Tensor, neg: torch.Tensor | None, scale: float) -> VelocityFn:
    """Velocity with classifier-free guidance `v_neg + w (v_cond - v_neg)`, the pair run as one batched call."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if neg is None or scale == 1.0:
            return model_fn(x, t, cond)
        v = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, neg]))
        v_cond, v_neg = v.chunk(2)
        return v_neg + scale * (v_cond - v_neg)

    return velocity


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, grid: torch.Tensor | Sequence[float],
                 trajectory: list | None = None) -> torch.Tensor:
    """Euler integration of dx/dt = v from t = grid[-1] down to grid[0] = 0.

    `trajectory`, when given, receives one `{"t": t, "x": x after the step (a CPU clone)}` per step, t being the
    time the step starts from (the velocity's input), so the intermediate states can be inspected (notebooks)
    without changing the sample.
    """
    x, times = noise, _times(grid)
    for i in range(len(times) - 1, 0, -1):
        t, t_prev = times[i], times[i - 1]
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))
        x = x - (t - t_prev) * v.to(x.dtype)
        if trajectory is not None:
            trajectory.append({"t": t, "x": x.detach().cpu().clone()})
    return x


@torch.no_grad()
def unipc_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int, gamma: float) -> torch.Tensor:
    """diffusers' UniPC multistep solver in flow-prediction mode (Wan's default pipeline solver)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=gamma, num_train_timesteps=1000)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for timestep, value in zip(scheduler.timesteps, scheduler.timesteps.tolist(), strict=True):
        t = torch.full((x.shape[0],), value / 1000.0, device=x.device, dtype=torch.float32)
        x = scheduler.step(velocity(x, t), timestep, x, return_dict=False)[0]
    return x


def teacher_sample(velocity: VelocityFn, noise: torch.Tensor, steps: int = 50, gamma: float = 3.0,
                   solver: str = "euler") -> torch.Tensor:
    """The teacher's sampler: `steps` solver steps on a shifted grid from t = 1 to 0."""
    if solver == "euler":
        return euler_sample(velocity, noise, time_grid(steps, gamma, t_max=1.0))
    if solver == "unipc":
        return unipc_sample(velocity, noise, steps, gamma)
    raise ValueError(f"unknown solver {solver!r}; use 'euler' or 'unipc'")


def student_grids(M: int, N: int, gamma: float = 10.0, t_max: float = 0.999) -> tuple[torch.Tensor, torch.Tensor]:
    """The TMD student's outer (M steps) and inner (N steps) grids: `shift(k/K, gamma)`, last point `t_max`."""
    return time_grid(M, gamma, t_max), time_grid(N, gamma, t_max)


@torch.no_grad()
def tmd_sample(student: torch.nn.Module, noise: torch.Tensor, text: torch.Tensor, M: int = 2, N: int = 2,
               gamma: float = 10.0, t_max: float = 0.999,
               inner_noise: list[torch.Tensor] | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Algorithm 1: for i = M .. 1, `m = backbone(x, t_i, c)`, `x <- x - (t_i - t_{i-1}) InnerFlow(m)`.

    One backbone pass and N head passes per outer step, no CFG. `inner_noise[i - 1]` is the fresh `y1` of outer
    step i (drawn here when not given).

    `trajectory`, when given, receives per outer step `{"t": t_i, "x": x after the step, "inner": [y after each
    of the N inner flow-map steps]}` (CPU clones). To see the inner states the rollout is run here step by step
    with `student.flow_map`, exactly as `student.inner_flow` runs it; without `trajectory`, `inner_flow` is called.
    """
    outer, inner = student_grids(M, N, gamma, t_max)
    outer = _times(outer)
    x = noise
    batch = x.shape[0]
    inner = inner.to(device=x.device, dtype=torch.float32)  # once per call, not per inner step
    for i in range(M, 0, -1):
        t = torch.full((batch,), outer[i], device=x.device, dtype=torch.float32)
        m = student.backbone(x, t, text)
        y1 = torch.randn_like(x) if inner_noise is None else inner_noise[i - 1].to(x)
        if trajectory is None:
            x = x - (outer[i] - outer[i - 1]) * student.inner_flow(m, inner, y1)
            continue
        y, inner_states = y1, []
        for j in range(len(inner) - 1, 0, -1):  # the loop of `TMDTransformer.inner_flow`, keeping every y
            s, r = inner[j].expand(batch), inner[j - 1].expand(batch)
            y = student.flow_map(y, s, r, m, y1)
            inner_states.append(y.detach().cpu().clone())
        x = x - (outer[i] - outer[i - 1]) * y
        trajectory.append({"t": outer[i], "x": x.detach().cpu().clone(), "inner": inner_states})
    return x


@torch.no_grad()
def dmd2_sample(velocity: VelocityFn, noise: torch.Tensor, grid: torch.Tensor | Sequence[float],
                trajectory: list | None = None) -> torch.Tensor:
    """DMD2-v's deterministic multi-step sampler: `x_{t_{i-1}} = (1 - t_{i-1}/t_i) g + (t_{i-1}/t_i) x_{t_i}` with
    `g = x_{t_i} - t_i v` (the student's x0), from t_M = grid[-1] to 0.

    `trajectory`, when given, receives one `{"t": t, "x": x after the step (a CPU clone)}` per step, t being the
    time the step starts from.
    """
    x, times = noise, _times(grid)
    for i in range(len(times) - 1, 0, -1):
        t, t_prev = times[i], times[i - 1]
        g = x - t * velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)).to(x.dtype)
        x = (1 - t_prev / t) * g + (t_prev / t) * x
        if trajectory is not None:
            trajectory.append({"t": t, "x": x.detach().cpu().clone()})
    return x

"""Samplers: the solvers, and the sampler objects that pair a network with its solver (docs/method.md §2).

A sampler object (`TeacherSampler`, `TMDSampler`, `FewStepSampler`) is the one place that knows how a kind of
network is sampled: its options and their defaults, its effective NFE, its label in tables, and the record a
checkpoint or export stores (`to_record` / `sampler_from_record`: a kind name and the options, never a class path).
A new kind of sampler is one class here plus its config. The flow convention is `tmd_lightning.flow`'s.

The sampling loops make no host-device synchronisation of their own: grids are built on the host and read as Python
floats once per call (`_times`), per-step times reach the device as `torch.full` fills, and the inner grid of the TMD
sampler is moved to the device once per call. (diffusers' UniPC scheduler looks its step index up itself.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from tmd_lightning.flow import time_grid
from tmd_lightning.models.wan_parts import wan_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> v


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


# -- sampler objects -------------------------------------------------------------------------------------------------
NoiseStream = Callable[[int], torch.Tensor]  # i -> the i-th extra noise draw per seed (same shape as the noise)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How one kind of network is sampled, with its options. Immutable: `with_options` returns a new one."""

    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Sampler]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Sampler._registry[cls.kind] = cls

    def options(self) -> dict[str, Any]:
        """The options as a plain dict (what `sample` prints and a summary records)."""
        return dataclasses.asdict(self)

    def with_options(self, **options: Any) -> Sampler:
        """This sampler with the non-None `options` replaced; an option this kind does not take is an error."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(self.options()))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no sampler option(s) {unknown}; it takes "
                             f"{sorted(self.options())}")
        return dataclasses.replace(self, **given)

    def to_record(self) -> dict[str, Any]:
        """What a checkpoint or an export stores about its sampler: the kind and the options."""
        return {"kind": self.kind, **self.options()}

    def sample(self, network: nn.Module, noise: torch.Tensor, text: torch.Tensor, neg: torch.Tensor | None = None,
               noise_stream: NoiseStream | None = None, trajectory: list | None = None) -> torch.Tensor:
        """Latents from `noise` (t = 1) for text embeddings `text`; `neg` is the negative prompt's embedding (CFG),
        `noise_stream(i)` the i-th extra per-seed noise draw (samplers that inject noise). `trajectory`, when given,
        receives the intermediate states (see the solver's docstring) without changing the sample."""
        raise NotImplementedError

    def nfe(self, network: nn.Module) -> float:
        """Effective NFE: DiT blocks executed per video / the network's depth (CFG counts twice)."""
        raise NotImplementedError

    def label(self) -> str:
        """A short name for tables and legends."""
        raise NotImplementedError

    def uses_cfg(self) -> bool:
        """Whether `sample` needs the negative prompt's embedding (classifier-free guidance)."""
        return False


def sampler_from_record(record: dict[str, Any], source: Any = "record") -> Sampler:
    """The sampler a checkpoint or export recorded (`Sampler.to_record`), from this module's kinds only."""
    record = dict(record)
    kind = record.pop("kind", None)
    if kind not in Sampler._registry:
        raise ValueError(f"{source}: names sampler kind {kind!r}, which is not one of {sorted(Sampler._registry)}")
    return Sampler._registry[kind]().with_options(**record)


@dataclasses.dataclass(frozen=True)
class TeacherSampler(Sampler):
    """The teacher: `steps` Euler (or UniPC) steps on a grid shifted by `gamma`, with CFG scale `cfg`."""

    kind: ClassVar[str] = "teacher"
    steps: int = 50
    cfg: float = 5.0
    gamma: float = 3.0
    solver: str = "euler"

    def sample(self, network: nn.Module, noise: torch.Tensor, text: torch.Tensor, neg: torch.Tensor | None = None,
               noise_stream: NoiseStream | None = None, trajectory: list | None = None) -> torch.Tensor:
        velocity = cfg_velocity(partial(wan_velocity, network), text, neg if self.uses_cfg() else None, self.cfg)
        if trajectory is not None:
            if self.solver != "euler":
                raise ValueError("intermediate states are recorded for solver='euler' only")
            return euler_sample(velocity, noise, time_grid(self.steps, self.gamma, t_max=1.0), trajectory)
        return teacher_sample(velocity, noise, self.steps, self.gamma, self.solver)

    def uses_cfg(self) -> bool:
        return self.cfg != 1.0

    def nfe(self, network: nn.Module) -> float:
        return effective_nfe(self.steps, cfg=self.uses_cfg())

    def label(self) -> str:
        solver = {"euler": "Euler", "unipc": "UniPC"}.get(self.solver, self.solver)
        return f"{solver} {self.steps} x CFG {self.cfg:g}" if self.uses_cfg() else f"{solver} {self.steps}, no CFG"


@dataclasses.dataclass(frozen=True)
class TMDSampler(Sampler):
    """Algorithm 1 for a `TMDTransformer`: M outer transition steps, N inner flow-head steps per transition, both
    grids shifted by `gamma` up to `t_max`; fresh inner noise per outer step (`noise_stream(i)`, i = 1..M)."""

    kind: ClassVar[str] = "tmd"
    M: int = 2
    N: int = 2
    gamma: float = 10.0
    t_max: float = 0.999

    def sample(self, network: nn.Module, noise: torch.Tensor, text: torch.Tensor, neg: torch.Tensor | None = None,
               noise_stream: NoiseStream | None = None, trajectory: list | None = None) -> torch.Tensor:
        inner_noise = None if noise_stream is None else [noise_stream(i) for i in range(1, self.M + 1)]
        return tmd_sample(network, noise, text, self.M, self.N, self.gamma, self.t_max, inner_noise=inner_noise,
                          trajectory=trajectory)

    def nfe(self, network: nn.Module) -> float:
        return effective_nfe(self.M, self.N, network.head_blocks, network.num_layers)

    def label(self) -> str:
        return f"TMD M={self.M} N={self.N}"


@dataclasses.dataclass(frozen=True)
class FewStepSampler(Sampler):
    """DMD2-v's deterministic M-step sampler for a distilled full Wan model (grid shifted by `gamma` up to
    `t_max`: 10 for 1-2 steps, 5 for 3-4)."""

    kind: ClassVar[str] = "few_step"
    M: int = 2
    gamma: float = 10.0
    t_max: float = 0.999

    def sample(self, network: nn.Module, noise: torch.Tensor, text: torch.Tensor, neg: torch.Tensor | None = None,
               noise_stream: NoiseStream | None = None, trajectory: list | None = None) -> torch.Tensor:
        velocity = cfg_velocity(partial(wan_velocity, network), text, None, 1.0)  # no guidance: v(x, t, text)
        return dmd2_sample(velocity, noise, time_grid(self.M, self.gamma, self.t_max), trajectory)

    def nfe(self, network: nn.Module) -> float:
        return effective_nfe(self.M)

    def label(self) -> str:
        return f"few-step M={self.M}"

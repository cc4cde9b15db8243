"""Time grids, effective NFE and samplers (docs/method.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from tmd_lightning.flow import shift, time_grid
from tmd_lightning.sampling import (
    FewStepSampler,
    TeacherSampler,
    TMDSampler,
    cfg_velocity,
    dmd2_sample,
    effective_nfe,
    euler_sample,
    sampler_from_record,
    student_grids,
    teacher_sample,
    tmd_sample,
)


def _delta_field(x0: torch.Tensor):
    """Exact rectified-flow velocity for data at x0: x_t = (1 - t) x0 + t eps, v = eps - x0 = (x_t - x0) / t."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - x0) / t.view(-1, *([1] * (x.dim() - 1)))

    return velocity


def _pair(shape=(2, 3, 2, 4, 4)):
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return x0, noise


# ------------------------------------------------------------------------------------------------------ shift


@pytest.mark.parametrize("gamma", [1.0, 3.0, 5.0, 10.0])
def test_shift_formula_and_fixed_points(gamma):
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    inner = u[1:-1]  # the shift multiplies the noise-to-signal odds t / (1 - t) by gamma (Wan's flow shift)
    torch.testing.assert_close(shift(inner, gamma) / (1 - shift(inner, gamma)), gamma * inner / (1 - inner))
    assert float(shift(0.0, gamma)) == 0.0
    assert float(shift(1.0, gamma)) == pytest.approx(1.0, abs=1e-15)
    s = shift(u, gamma)
    assert (s[1:] > s[:-1]).all()  # strictly increasing
    if gamma > 1:
        assert (s[1:-1] > u[1:-1]).all()  # pushed toward noise (t = 1)
    else:
        torch.testing.assert_close(s, u)


def test_shift_known_values():
    assert shift(0.5, 3.0) == pytest.approx(0.75)
    assert shift(0.5, 10.0) == pytest.approx(10 / 11)
    assert shift(0.25, 3.0) == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------------- time_grid


@pytest.mark.parametrize("steps,gamma,t_max", [(1, 1.0, 1.0), (4, 10.0, 0.999), (50, 3.0, 1.0), (2, 10.0, 0.999)])
def test_time_grid_properties(steps, gamma, t_max):
    g = time_grid(steps, gamma, t_max)
    assert g.shape == (steps + 1,)
    assert g[0] == 0.0
    assert g[-1] == pytest.approx(t_max, abs=1e-12)
    assert (g[1:] > g[:-1]).all()


def test_time_grid_gamma10_matches_shift_of_uniform():
    K = 4
    g = time_grid(K, 10.0, t_max=0.999)
    assert g.tolist() == pytest.approx([0.0, 10 / 13, 10 / 11, 30 / 31, 0.999], abs=1e-12)  # shift(k/4, 10), by hand


def test_time_grid_rejects_zero_steps():
    with pytest.raises(ValueError):
        time_grid(0)


# ---------------------------------------------------------------------------------------------- effective NFE


def test_effective_nfe_matches_tmd_paper():
    assert effective_nfe(M=1, N=2, H=5, L=30) == pytest.approx(7 / 6)
    assert round(effective_nfe(M=1, N=2, H=5, L=30), 2) == 1.17
    assert effective_nfe(M=2, N=2, H=5, L=30) == pytest.approx(7 / 3)
    assert effective_nfe(M=1, N=4, H=5, L=40) == pytest.approx(1.375)
    assert effective_nfe(M=2, N=4, H=5, L=40) == pytest.approx(2.75)
    assert effective_nfe(50, cfg=True) == 100
    assert effective_nfe(50) == 50
    assert effective_nfe(M=4, N=1, H=5, L=30) == 4  # N = 1: the head runs once, no extra blocks


# ----------------------------------------------------------------------------------------------------- Euler


@pytest.mark.parametrize("steps,gamma", [(1, 1.0), (3, 3.0), (10, 10.0)])
def test_euler_on_delta_field_lands_on_data_and_follows_the_path(steps, gamma):
    x0, noise = _pair()
    field = _delta_field(x0)
    seen = []

    def velocity(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        seen.append((x.clone(), float(t[0])))
        return field(x, t)

    out = euler_sample(velocity, noise, time_grid(steps, gamma, 1.0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert len(seen) == steps  # t = 0 is never evaluated
    times = [t for _, t in seen]
    assert times[0] == 1.0 and times == sorted(times, reverse=True)
    # for this field Euler is exact: every visited state lies on the straight path (1 - t) x0 + t noise
    for x, t in seen:
        torch.testing.assert_close(x, (1 - t) * x0 + t * noise, atol=1e-5, rtol=0)


def test_euler_constant_velocity():
    noise = torch.zeros(1, 2, 3)
    c = torch.tensor([1.0, -2.0, 0.5])
    out = euler_sample(lambda x, t: c.expand_as(x), noise, time_grid(7, 3.0, t_max=0.8))
    torch.testing.assert_close(out, -0.8 * c.expand_as(noise))


# -------------------------------------------------------------------------------------------------------- CFG


def test_cfg_velocity_is_one_batched_call_and_matches_separate_calls():
    g = torch.Generator().manual_seed(2)
    w_x, w_c = torch.randn(3, 3, generator=g), torch.randn(5, 3, generator=g)

    def model(x, t, c):  # a nonlinear toy "model" of x, t and the text
        return torch.tanh(x @ w_x + t.view(-1, 1) + c.mean(1) @ w_c)

    calls = []

    def counted(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c)

    x = torch.randn(4, 3, generator=g)
    t = torch.rand(4, generator=g)
    cond, neg = torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, 5, generator=g)
    scale = 4.5
    v = cfg_velocity(counted, cond, neg, scale)(x, t)
    assert calls == [8]  # one call on the doubled batch
    v_cond, v_neg = model(x, t, cond), model(x, t, neg)
    torch.testing.assert_close(v, v_neg + scale * (v_cond - v_neg), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(v, v_cond, atol=1e-3)

    calls.clear()  # scale 1 or no negative: a single conditional call on the plain batch
    torch.testing.assert_close(cfg_velocity(counted, cond, neg, 1.0)(x, t), v_cond)
    torch.testing.assert_close(cfg_velocity(counted, cond, None, 5.0)(x, t), v_cond)
    assert calls == [4, 4]


# ------------------------------------------------------------------------------------------------------ UniPC


@pytest.mark.parametrize("steps,gamma", [(5, 3.0), (20, 1.0)])
def test_unipc_on_delta_field_lands_near_data(steps, gamma):
    x0, noise = _pair()
    calls = []

    def velocity(x, t):
        calls.append(float(t[0]))
        return _delta_field(x0)(x, t)

    out = teacher_sample(velocity, noise, steps=steps, gamma=gamma, solver="unipc")
    # not exact: diffusers rounds timesteps to integers (t = floor(1000 sigma) / 1000), as Wan's own pipeline does
    assert (out - x0).abs().max() < 0.02
    assert (noise - x0).abs().max() > 1.0  # the tolerance is far below the distance it had to travel
    assert len(calls) == steps
    assert calls == sorted(calls, reverse=True) and 0.99 <= calls[0] <= 1.0


def test_teacher_sample_euler_uses_shifted_grid():
    x0, noise = _pair()
    times = []

    def velocity(x, t):
        times.append(float(t[0]))
        return _delta_field(x0)(x, t)

    out = teacher_sample(velocity, noise, steps=4, gamma=3.0, solver="euler")
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    expect = [3 * u / (2 * u + 1) for u in (1.0, 0.75, 0.5, 0.25)]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(times, expect, strict=True))


def test_teacher_sample_unknown_solver_raises():
    x0, noise = _pair()
    with pytest.raises(ValueError, match="unknown solver"):
        teacher_sample(_delta_field(x0), noise, steps=2, solver="dpm++")


# ------------------------------------------------------------------------------------------------- trajectories


def test_euler_and_dmd2_trajectories_record_every_step_and_leave_the_sample_unchanged():
    x0, noise = _pair()
    grid = time_grid(4, 3.0, 1.0)

    def velocity(x, t):  # not the exact delta field, so every step moves the state somewhere new
        return _delta_field(x0)(x, t) + 0.3 * torch.sin(x)

    for sampler in (euler_sample, dmd2_sample):
        plain = sampler(velocity, noise, grid)
        trajectory: list = []
        out = sampler(velocity, noise, grid, trajectory=trajectory)
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
        assert [step["t"] for step in trajectory] == [float(t) for t in grid[1:].flip(0)]  # the steps' start times
        assert all(step["x"].device.type == "cpu" and step["x"].shape == noise.shape for step in trajectory)
        torch.testing.assert_close(trajectory[-1]["x"], out, atol=0, rtol=0)
        xs = [noise] + [step["x"] for step in trajectory]
        assert all(not torch.equal(a, b) for a, b in zip(xs, xs[1:], strict=False))
        assert trajectory[0]["x"] is not out  # clones, not views of the running state


_TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, rope_max_seq_len=64)


def _tiny_student():
    """A random tiny TMD student whose head depends on the inner sample (fusion and Δ-embedder moved off init)."""
    from diffusers import WanTransformer3DModel

    from tmd_lightning.models import TMDTransformer

    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**_TINY_WAN).eval()
    student = TMDTransformer.from_teacher(teacher, head_blocks=1).eval()
    with torch.no_grad():
        student.wan.proj_out.weight.normal_(std=0.2)
        student.inner_fusion.proj_out.weight.normal_(std=0.2)
        student.delta_embedder.linear_2.weight.normal_(std=0.2)
    return student


@pytest.mark.parametrize("M,N", [(2, 2), (1, 3), (3, 1)])
def test_tmd_trajectory_records_outer_and_inner_steps_and_leaves_the_sample_unchanged(M, N):
    student = _tiny_student()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 2, 4, 4, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    inner_noise = [torch.randn(noise.shape, generator=g) for _ in range(M)]
    plain = tmd_sample(student, noise, text, M, N, inner_noise=inner_noise)
    trajectory: list = []
    out = tmd_sample(student, noise, text, M, N, inner_noise=inner_noise, trajectory=trajectory)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    torch.testing.assert_close(trajectory[-1]["x"], out, atol=0, rtol=0)

    outer, inner = student_grids(M, N)
    assert len(trajectory) == M
    assert [step["t"] for step in trajectory] == [float(t) for t in outer[1:].flip(0)]
    x = noise
    with torch.no_grad():
        for k, step in enumerate(trajectory):
            i = M - k  # outer step i runs from t_i to t_{i-1} with inner noise inner_noise[i - 1]
            assert len(step["inner"]) == N
            assert all(y.device.type == "cpu" and y.shape == noise.shape for y in step["inner"])
            m = student.backbone(x, torch.full((2,), float(outer[i])), text)
            torch.testing.assert_close(step["inner"][-1], student.inner_flow(m, inner, inner_noise[i - 1]),
                                       atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(step["x"], x - float(outer[i] - outer[i - 1]) * step["inner"][-1],
                                       atol=1e-6, rtol=1e-6)
            x = step["x"]


# ------------------------------------------------------------------------------------------------------ bf16

BF16_SAMPLE_TOLERANCE = 0.02  # relative L2 bf16 vs float32; measured teacher 0.009, TMD 0.004, DMD2-v 0.004


def test_bf16_weights_sample_like_float32():
    """Teacher (Euler x CFG 5), TMD and DMD2-v samplers with bf16 weights (diffusers' float32-kept modules float32)
    take the float32 noise and text they are given, return float32, and land within 2 % of the float32 run."""
    import copy

    from tmd_lightning.models.precision import cast_model
    from tmd_lightning.models.wan_parts import wan_velocity

    student = _tiny_student()
    wan = copy.deepcopy(student.wan)  # a Wan model: the teacher and the DMD2-v student
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 2, 4, 4, generator=g)
    text, neg = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    inner_noise = [torch.randn(noise.shape, generator=g) for _ in range(2)]

    def samples(wan, student) -> dict[str, torch.Tensor]:
        velocity = cfg_velocity(lambda x, t, c: wan_velocity(wan, x, t, c), text, neg, 5.0)
        return {"teacher": teacher_sample(velocity, noise, steps=8, gamma=3.0),
                "TMD": tmd_sample(student, noise, text, M=2, N=2, inner_noise=inner_noise),
                "DMD2-v": FewStepSampler(M=2, gamma=10.0, t_max=0.999).sample(wan, noise, text)}

    reference = samples(wan, student)
    low = samples(cast_model(wan, torch.bfloat16), cast_model(student, torch.bfloat16))
    assert wan.blocks[0].attn1.to_q.weight.dtype == student.wan.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    for name, x in low.items():
        assert x.dtype == torch.float32, name
        error = float((x - reference[name]).norm() / reference[name].norm())
        assert 0 < error < BF16_SAMPLE_TOLERANCE, (name, error)  # > 0: the bf16 weights were really used


# ------------------------------------------------------------------------------------------------------ sampler objects


@pytest.mark.parametrize("sampler", [TeacherSampler(steps=7, cfg=1.0, solver="unipc"), TMDSampler(M=1, N=4),
                                     FewStepSampler(M=3, gamma=5.0)])
def test_a_sampler_round_trips_through_its_record(sampler) -> None:
    import json

    record = json.loads(json.dumps(sampler.to_record()))  # what a checkpoint or sampling.json holds: plain JSON
    assert record["kind"] == sampler.kind and sampler_from_record(record) == sampler


def test_sampler_options_are_checked_and_none_keeps_the_default() -> None:
    sampler = TMDSampler()
    assert sampler.with_options(M=1, N=None).options() == {"M": 1, "N": 2, "gamma": 10.0, "t_max": 0.999}
    assert sampler.options()["M"] == 2  # immutable: with_options returns a new sampler
    with pytest.raises(ValueError, match=r"TMDSampler has no sampler option\(s\) \['steps'\]"):
        sampler.with_options(steps=4)
    with pytest.raises(ValueError, match="names sampler kind 'nope'"):
        sampler_from_record({"kind": "nope"})


def test_sampler_labels_and_nfe() -> None:
    student = _tiny_student()  # L = 3 blocks, H = 1
    assert TeacherSampler().label() == "Euler 50 x CFG 5" and TeacherSampler().nfe(student.wan) == 100
    assert TeacherSampler(steps=2, cfg=1.0).label() == "Euler 2, no CFG"
    assert TMDSampler(M=2, N=2).label() == "TMD M=2 N=2"
    assert TMDSampler(M=2, N=2).nfe(student) == pytest.approx(effective_nfe(2, 2, student.head_blocks,
                                                                           student.num_layers))
    assert FewStepSampler(M=1).label() == "few-step M=1" and FewStepSampler(M=1).nfe(student.wan) == 1
    assert TMDSampler().with_options(N=4).label() == "TMD M=2 N=4" and FewStepSampler(M=3).label() == "few-step M=3"
    assert TeacherSampler(steps=8, solver="unipc").label() == "UniPC 8 x CFG 5"


def test_the_teacher_sampler_is_cfg_euler_on_the_wan_velocity() -> None:
    """`TeacherSampler.sample` = `teacher_sample` of the CFG velocity, independently composed here."""
    from tmd_lightning.models.wan_parts import wan_velocity

    wan = _tiny_student().wan
    g = torch.Generator().manual_seed(3)
    noise, text, neg = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 5, 16, generator=g), \
        torch.randn(2, 5, 16, generator=g)
    velocity = cfg_velocity(lambda x, t, c: wan_velocity(wan, x, t, c), text, neg, 4.0)
    with torch.no_grad():
        expected = teacher_sample(velocity, noise, steps=3, gamma=3.0)
        trajectory: list = []
        got = TeacherSampler(steps=3, cfg=4.0).sample(wan, noise, text, neg, trajectory=trajectory)
    assert torch.equal(got, expected) and len(trajectory) == 3 and torch.equal(trajectory[-1]["x"], got)

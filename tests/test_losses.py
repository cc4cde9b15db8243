"""TM-MeanFlow pieces (docs/method.md §4) against analytic derivatives and `torch.func.jvp`."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from tmd_lightning.flow import time_grid
from tmd_lightning.losses import (
    adaptive_loss,
    cfg_target,
    finite_difference_ds,
    flow_matching_loss,
    meanflow_target,
    sample_r,
)
from tmd_lightning.models import TMDTransformer

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, rope_max_seq_len=64)


def test_sample_r_is_the_grid_point_below_s_or_s():
    grid = time_grid(2, 10.0, 0.999)  # 0, 0.909, 0.999
    s = torch.tensor([0.05, 0.5, float(grid[1]), 0.95, 0.9995, 0.3])  # s on a grid point: r = s
    r = sample_r(s, grid, 0.75, uniform=torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.1]))
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, float(grid[1]), float(grid[1]), 0.999, 0.3]))
    s = torch.rand(20000) * 0.998 + 0.001
    r = sample_r(s, grid, 0.75)
    assert (r <= s).all()
    assert abs((r == s).float().mean().item() - 0.75) < 0.02


def test_cfg_target_guides_only_kept_rows():
    v, u_neg = torch.randn(4, 2, 1, 1, 1), torch.randn(4, 2, 1, 1, 1)
    guided = torch.tensor([True, False, True, False])
    out = cfg_target(v, u_neg, 3.0, guided)
    torch.testing.assert_close(out[0], 3 * v[0] - 2 * u_neg[0])
    torch.testing.assert_close(out[1], v[1])


def test_finite_difference_matches_an_analytic_total_derivative_and_is_one_sided_at_borders():
    """u(y, s) = sin(3 s) y^2 along dy/ds = w: du/ds = 3 cos(3 s) y^2 + 2 sin(3 s) y w."""
    g = torch.Generator().manual_seed(0)
    y, w = torch.randn(4, 3, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, 2, generator=g,
                                                                                      dtype=torch.float64)
    s = torch.tensor([0.5, 0.0005, 0.9999, 0.2], dtype=torch.float64)  # interior, lower border, upper border
    rows = s.view(-1, 1, 1, 1, 1)
    calls = []

    def u_fn(samples: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        calls.append(samples.shape[0])
        return torch.sin(3 * s_).view(-1, 1, 1, 1, 1) * samples**2

    exact = 3 * torch.cos(3 * rows) * y**2 + 2 * torch.sin(3 * rows) * y * w
    fd = finite_difference_ds(u_fn, y, s, w, delta=1e-4)
    assert calls == [8]  # one call on both stencil points
    torch.testing.assert_close(fd[[0, 3]], exact[[0, 3]], rtol=1e-6, atol=1e-7)  # central: O(δ²)
    torch.testing.assert_close(fd[[1, 2]], exact[[1, 2]], rtol=1e-3, atol=1e-3)  # one-sided: O(δ)
    with pytest.raises(ValueError, match="no room"):
        finite_difference_ds(u_fn, y, s, w, delta=2.0)


def test_meanflow_target_and_adaptive_loss():
    v, du = torch.randn(3, 2, 1, 1, 1), torch.randn(3, 2, 1, 1, 1)
    s, r = torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.2, 0.5, 0.0])
    target = meanflow_target(v, du, s, r)
    torch.testing.assert_close(target, v - (s - r).view(-1, 1, 1, 1, 1) * du)
    torch.testing.assert_close(target[1], v[1])  # r = s: plain transition matching
    pred = torch.randn(3, 2, 1, 1, 1, requires_grad=True)
    loss, e = adaptive_loss(pred, target, c=2.0)
    err = (pred - target).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(loss, (err / (err + 2.0)).mean())
    torch.testing.assert_close(e, err.detach())
    loss.backward()
    # the denominator is stop-gradient: d/dpred = 2 (pred - target) / (e + c) / B
    expected = 2 * (pred - target) / (err.detach() + 2.0).view(-1, 1, 1, 1, 1) / 3
    torch.testing.assert_close(pred.grad, expected.detach())


def test_adaptive_loss_weights_move_the_error_between_elements_at_the_same_scale():
    """A per-element weight, rescaled to mean 1 per sample: uniform weights change nothing, scaling them changes
    nothing, and zero weight drops an element (the toy's shape weight in Stage 1)."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, 2, generator=g)
    plain, e_plain = adaptive_loss(pred, target, c=2.0)
    for uniform in (torch.ones(3, 1, 2, 2, 2), torch.full((3, 2, 2, 2, 2), 7.0)):
        loss, e = adaptive_loss(pred, target, 2.0, uniform)
        torch.testing.assert_close(loss, plain)
        torch.testing.assert_close(e, e_plain)
    weight = torch.rand(3, 2, 2, 2, 2, generator=g)
    weight[:, :, 0] = 0.0
    loss, e = adaptive_loss(pred, target, 2.0, weight)
    n = weight[0].numel()
    expected = ((pred - target).pow(2) * weight).flatten(1).sum(1) * n / weight.flatten(1).sum(1)
    torch.testing.assert_close(e, expected)
    torch.testing.assert_close(loss, (expected / (expected + 2.0)).mean())
    moved = pred.clone()
    moved[:, :, 0] += 5.0  # error only where the weight is zero
    torch.testing.assert_close(adaptive_loss(moved, target, 2.0, weight)[1], e)


@pytest.fixture
def float64_wan(monkeypatch):
    """Wan's blocks cast to float32 (`.float()`) on purpose; for a float64 check those casts keep float64."""
    original = torch.Tensor.float

    def keep_float64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", keep_float64)
    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**WAN)
    with torch.no_grad():
        teacher.proj_out.weight.normal_(std=0.2)
    student = TMDTransformer.from_teacher(teacher, head_blocks=1).double().eval()
    with torch.no_grad():  # trained-looking new parts, so s - r and y_s both matter
        student.delta_embedder.linear_2.weight.normal_(std=0.05)
        student.inner_fusion.proj_out.weight.normal_(std=0.05)
    return student


def test_finite_difference_du_ds_agrees_with_jvp(float64_wan):
    """du/ds along (ṽ, 1) by the stage's finite difference vs forward-mode AD, float64, math attention."""
    student = float64_wan
    g = torch.Generator().manual_seed(1)
    b = 2
    x_t = torch.randn(b, 4, 2, 4, 4, generator=g, dtype=torch.float64)
    text = torch.randn(b, 5, 16, generator=g, dtype=torch.float64)
    y_s, y1, v = (torch.randn(x_t.shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.6], dtype=torch.float64)
    s, r = torch.tensor([0.7, 0.35], dtype=torch.float64), torch.tensor([0.4, 0.0], dtype=torch.float64)
    rows = lambda a: a.view(-1, 1, 1, 1, 1)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        m = student.backbone(x_t, t, text)

        def along(tau: torch.Tensor) -> torch.Tensor:  # u(y_s + τ ṽ, s + τ, r)
            return student.average_velocity(y_s + rows(tau) * v, s + tau, r, m, y1)

        _, jvp = torch.func.jvp(along, (torch.zeros(b, dtype=torch.float64),), (torch.ones(b, dtype=torch.float64),))
        m2 = m.repeat(2)

        def u_fn(samples: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            return student.average_velocity(samples, s_, r.repeat(2), m2, y1.repeat(2, 1, 1, 1, 1))

        error = {delta: float((finite_difference_ds(u_fn, y_s, s, v, delta) - jvp).abs().max() / jvp.abs().max())
                 for delta in (5e-3, 1e-4, 1e-5, 1e-6)}
    assert jvp.abs().max() > 1e-3  # a real derivative, not zero
    assert error[1e-5] < 1e-4 and error[1e-6] < 1e-6
    assert error[1e-5] < error[1e-4] / 50  # central difference: error falls as δ², no float32 round-off floor
    # the training δ = 5e-3 (5 timestep units at Wan's 1000 s scale) is a deliberately smoothed derivative
    assert error[5e-3] > 100 * error[1e-4]


def test_bf16_finite_difference_agrees_with_jvp_better_than_naive_bf16():
    """A bf16 student (diffusers' float32-kept modules float32) against the float32 JVP. The stage's difference forms
    the stencil (times s ± δ, samples y_s ± δṽ) and the quotient in float32 and the head embeds them in float32;
    the naive bf16 difference forms them in bf16, where s ± δ is a few ulps of s and δṽ one or two ulps of y_s."""
    import copy

    from tmd_lightning.models.precision import cast_model

    torch.manual_seed(0)
    student = TMDTransformer.from_teacher(WanTransformer3DModel(**WAN), head_blocks=1).eval()
    with torch.no_grad():  # trained-looking new parts, so s - r and y_s both matter
        student.wan.proj_out.weight.normal_(std=0.2)
        student.delta_embedder.linear_2.weight.normal_(std=0.05)
        student.inner_fusion.proj_out.weight.normal_(std=0.05)
    low = cast_model(copy.deepcopy(student), torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    b = 4
    x_t, text = torch.randn(b, 4, 2, 4, 4, generator=g), torch.randn(b, 5, 16, generator=g)
    y_s, y1, v = (torch.randn(x_t.shape, generator=g) for _ in range(3))
    t = torch.tensor([0.9, 0.6, 0.3, 0.95])
    s, r = torch.tensor([0.7, 0.35, 0.5, 0.12]), torch.tensor([0.4, 0.0, 0.2, 0.0])
    rows = lambda a: a.view(-1, 1, 1, 1, 1)  # noqa: E731

    def fd(model: TMDTransformer, delta: float) -> torch.Tensor:
        m, r2, y1_2 = model.backbone(x_t, t, text).repeat(2), r.repeat(2), y1.repeat(2, 1, 1, 1, 1)
        return finite_difference_ds(lambda y, s_: model.average_velocity(y, s_, r2, m, y1_2), y_s, s, v, delta)

    def naive_bf16_fd(delta: float) -> torch.Tensor:
        bf = torch.bfloat16
        m = low.backbone(x_t, t, text).repeat(2)
        sb, yb, vb = s.to(bf), y_s.to(bf), v.to(bf)
        s_hi, s_lo = sb + delta, sb - delta
        stencil = torch.cat([yb + rows(s_hi - sb) * vb, yb + rows(s_lo - sb) * vb])
        u_hi, u_lo = low.average_velocity(stencil, torch.cat([s_hi, s_lo]), r.to(bf).repeat(2), m,
                                          y1.to(bf).repeat(2, 1, 1, 1, 1)).chunk(2)
        return (u_hi - u_lo) / rows(s_hi - s_lo)

    def error(a: torch.Tensor, reference: torch.Tensor) -> float:
        return float((a.float() - reference).norm() / reference.norm())

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        m = student.backbone(x_t, t, text)
        _, jvp = torch.func.jvp(lambda tau: student.average_velocity(y_s + rows(tau) * v, s + tau, r, m, y1),
                                (torch.zeros(b),), (torch.ones(b),))
        # δ = 1e-3, where float32's difference is close to the JVP (0.13; Wan's fast sinusoids bend it at larger δ)
        assert error(fd(student, 1e-3), jvp) < 0.2
        assert error(fd(low, 1e-3), jvp) < 0.2  # measured 0.14 (float32: 0.13)
        assert not torch.isfinite(naive_bf16_fd(1e-3)).all()  # s ± δ round back to s for s >= 0.5: 0 / 0
        # the training δ = 5e-3, against float32's difference at the same δ
        reference = fd(student, 5e-3)
        assert error(fd(low, 5e-3), reference) < 0.08  # measured 0.04
        assert error(naive_bf16_fd(5e-3), reference) > 0.3  # measured 0.69


def test_weighted_flow_matching_loss_is_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    v, x, noise = (torch.randn(2, 3, 4, 2, 2, generator=g) for _ in range(3))
    assert flow_matching_loss(v, x, noise) == pytest.approx(((v - (noise - x)) ** 2).mean().item())
    weight = 1 + 3 * (torch.rand(2, 1, 4, 2, 2, generator=g) > 0.5).float()  # broadcast over channels
    err = (v - (noise - x)) ** 2
    expected = (err * weight).sum() / weight.expand_as(err).sum()
    assert flow_matching_loss(v, x, noise, weight) == pytest.approx(expected.item())
    assert flow_matching_loss(v, x, noise, torch.ones_like(v)) == pytest.approx(flow_matching_loss(v, x, noise).item())

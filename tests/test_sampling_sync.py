"""The sampling loops without host-device synchronisation (issue item 7): results bit-identical to the loops as they
were (per-step `float()` reads of the grid, the inner grid moved per inner step; kept below as the reference), and no
`.item()` / `float()` / `int()` / `bool()` on a tensor, nor a device tensor read back, inside a sampling call."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.flow import time_grid
from tmd_lightning.models import TMDTransformer
from tmd_lightning.models.wan_parts import wan_velocity
from tmd_lightning.sampling import FewStepSampler, dmd2_sample, euler_sample, student_grids, teacher_sample, tmd_sample

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=3)


# -- the loops before the change (reference) ---------------------------------------------------------------------------
def old_euler(velocity, noise, grid):
    x = noise
    for i in range(len(grid) - 1, 0, -1):
        t, t_prev = float(grid[i]), float(grid[i - 1])
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))
        x = x - (t - t_prev) * v.to(x.dtype)
    return x


def old_dmd2(velocity, noise, grid):
    x = noise
    for i in range(len(grid) - 1, 0, -1):
        t, t_prev = float(grid[i]), float(grid[i - 1])
        g = x - t * velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)).to(x.dtype)
        x = (1 - t_prev / t) * g + (t_prev / t) * x
    return x


def old_tmd(student, noise, text, M, N, gamma, t_max, inner_noise):
    outer, inner = student_grids(M, N, gamma, t_max)
    x, batch = noise, noise.shape[0]
    for i in range(M, 0, -1):
        t = torch.full((batch,), float(outer[i]), device=x.device, dtype=torch.float32)
        m = student.backbone(x, t, text)
        y1 = inner_noise[i - 1].to(x)
        y = y1
        for j in range(len(inner) - 1, 0, -1):  # `TMDTransformer.inner_flow` as it was
            s = inner[j].to(torch.float32).expand(batch).to(y.device)
            r = inner[j - 1].to(torch.float32).expand(batch).to(y.device)
            y = student.flow_map(y, s, r, m, y1)
        x = x - float(outer[i] - outer[i - 1]) * y
    return x


@pytest.fixture(scope="module")
def nets() -> tuple[WanTransformer3DModel, TMDTransformer]:
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        wan.proj_out.weight.normal_(std=0.1)
    return wan, TMDTransformer.from_teacher(wan, head_blocks=1).eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 48, 3, 4, 4, generator=g)
    return noise, torch.randn(batch, 8, 64, generator=g), [torch.randn(batch, 48, 3, 4, 4, generator=g)
                                                            for _ in range(4)]


@torch.no_grad()
def test_sampling_loops_are_bit_identical_to_the_per_step_reads(nets):
    wan, student = nets
    noise, text, inner = _inputs()

    def velocity(x, t):
        return wan_velocity(wan, x, t, text)

    grid = time_grid(7, 3.0, 1.0)
    assert torch.equal(teacher_sample(velocity, noise, 7, 3.0), old_euler(velocity, noise, grid))
    assert torch.equal(euler_sample(velocity, noise, grid), old_euler(velocity, noise, grid))
    few = time_grid(3, 5.0, 0.999)
    assert torch.equal(FewStepSampler(3, 5.0, 0.999).sample(wan, noise, text), old_dmd2(velocity, noise, few))
    for M, N in [(2, 2), (1, 4), (3, 1)]:
        new = tmd_sample(student, noise, text, M, N, 10.0, 0.999, inner_noise=inner)
        assert torch.equal(new, old_tmd(student, noise, text, M, N, 10.0, 0.999, inner)), (M, N)
        trajectory: list = []
        assert torch.equal(tmd_sample(student, noise, text, M, N, 10.0, 0.999, inner_noise=inner,
                                      trajectory=trajectory), new)


@contextmanager
def no_host_reads():
    """Every way a sampling loop could read a tensor back to the host raises (CPU tensors' `tolist`, used once per
    call for the host-built grids, stays allowed: it copies nothing from a device)."""
    def refuse(name):
        def fail(self, *a, **k):
            raise AssertionError(f"Tensor.{name} inside a sampling loop (a host-device sync on a GPU)")
        return fail

    tolist = torch.Tensor.tolist

    def host_tolist(self):
        if self.device.type != "cpu":
            raise AssertionError("a device tensor read back to the host inside a sampling loop")
        return tolist(self)

    saved = {n: getattr(torch.Tensor, n) for n in ("item", "__float__", "__int__", "__bool__", "tolist")}
    for n in ("item", "__float__", "__int__", "__bool__"):
        setattr(torch.Tensor, n, refuse(n))
    torch.Tensor.tolist = host_tolist
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@torch.inference_mode()
def test_sampling_loops_read_nothing_back_per_step(nets):
    wan, student = nets
    noise, text, inner = _inputs()
    calls = []

    def velocity(x, t):
        calls.append(t.shape)
        return x * 0.5  # zero-cost stand-in: only the loop's own operations run

    with no_host_reads():
        teacher_sample(velocity, noise, 12, 3.0)
        dmd2_sample(velocity, noise, time_grid(4, 5.0, 0.999))
        tmd_sample(student, noise, text, 2, 3, 10.0, 0.999, inner_noise=inner)
        FewStepSampler(2, 10.0, 0.999).sample(wan, noise, text)
    assert len(calls) == 12 + 4
    with pytest.raises(AssertionError, match="Tensor.__float__"), no_host_reads():  # the check itself works
        old_euler(velocity, noise, time_grid(2))

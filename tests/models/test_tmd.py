"""The TMD student (docs/method.md §3) against diffusers' own Wan forward pass, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.flow import time_grid
from tmd_lightning.models import BackboneOutput, TMDTransformer, build_student
from tmd_lightning.sampling import effective_nfe, euler_sample, student_grids, tmd_sample

# patch (1, 2, 2) so the unpatchify of the head is exercised; 4 blocks so H can be 1..3
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=64)


def _teacher(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    teacher = WanTransformer3DModel(**WAN).eval()
    with torch.no_grad():  # random (not default-zero) output head, so every path carries signal
        teacher.proj_out.weight.normal_(std=0.2)
    return teacher


def _inputs(b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 3, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    text = torch.randn(b, 5, 16, generator=g)
    return x, t, text


def _teacher_v(teacher: WanTransformer3DModel, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return teacher(x, timestep=t * 1000.0, encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("head_blocks", [1, 2, 3])
@torch.no_grad()
def test_gated_student_is_the_teacher_at_init(head_blocks):
    """head(y_s, s=t, r=t, backbone(x_t, t)) == diffusers' v(x_t, t) for any y_s."""
    teacher = _teacher()
    student = TMDTransformer.from_teacher(teacher, head_blocks=head_blocks, fusion="gated").eval()
    x, t, text = _inputs()
    ref = _teacher_v(teacher, x, t, text)
    m = student.backbone(x, t, text)
    assert isinstance(m, BackboneOutput) and m.hidden_states.shape == (3, 3 * 4 * 4, 24)
    for seed in (0, 1):
        y_s = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 3
        out = student.head(y_s, t, t, m, text)
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_concat_student_is_close_at_init_and_exact_with_the_y_half_zeroed():
    teacher = _teacher()
    student = TMDTransformer.from_teacher(teacher, head_blocks=2, fusion="concat").eval()
    x, t, text = _inputs()
    ref = _teacher_v(teacher, x, t, text)
    y_s = torch.randn_like(x)
    out = student.head(y_s, t, t, student.backbone(x, t, text), text)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2  # N(0, 0.01^2) on the y half: close, not exact
    h_half = student.inner_fusion.proj.weight[:, student.inner_dim :]
    assert 0.005 < h_half.std() < 0.02
    h_half.zero_()
    torch.testing.assert_close(student.head(y_s, t, t, student.backbone(x, t, text), text), ref,
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_head_depends_on_the_new_parts_once_they_move():
    """The equivalence is not vacuous: a non-zero Δ-embedder output or fusion output changes the head."""
    teacher = _teacher()
    student = TMDTransformer.from_teacher(teacher, head_blocks=2).eval()
    x, t, text = _inputs()
    m = student.backbone(x, t, text)
    base = student.head(x, t, t, m)
    assert torch.equal(student.head(x, t, t * 0.5, m), base)  # Δ-embedder output is zero at init ...
    student.delta_embedder.linear_2.weight.normal_(std=0.1)
    assert not torch.allclose(student.head(x, t, t * 0.5, m), base, atol=1e-4)  # ... but it is wired in
    student.inner_fusion.proj_out.weight.normal_(std=0.1)
    a, b = student.head(x, t, t, m), student.head(torch.randn_like(x), t, t, m)
    assert not torch.allclose(a, b, atol=1e-4)  # y_s now reaches the head


def test_delta_embedder_is_trainable_from_zero_and_teacher_is_not_shared():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = TMDTransformer.from_teacher(teacher, head_blocks=2)
    x, t, text = _inputs()
    m = student.backbone(x, t, text)
    student.head(torch.randn_like(x), t, t * 0.3, m).pow(2).mean().backward()
    d = student.delta_embedder
    assert d.linear_2.weight.grad.abs().sum() > 0  # zero last layer still receives a gradient
    assert d.linear_1.weight.grad is None or d.linear_1.weight.grad.abs().sum() == 0  # ... its input layer not yet
    assert student.inner_fusion.proj_out.weight.grad.abs().sum() > 0
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # the student is a copy
    assert not torch.equal(student.wan.proj_out.weight, teacher.proj_out.weight)


def test_from_teacher_rejects_bad_arguments():
    teacher = _teacher()
    with pytest.raises(ValueError, match="head_blocks"):
        TMDTransformer.from_teacher(teacher, head_blocks=4)
    with pytest.raises(ValueError, match="fusion"):
        TMDTransformer.from_teacher(teacher, head_blocks=1, fusion="sum")


@torch.no_grad()
def test_flow_map_sign_returns_y_for_an_exact_head():
    """With a head that returns the exact y, every jump lands on the inner path and the rollout returns y."""
    student = TMDTransformer.from_teacher(_teacher(), head_blocks=1)
    x, t, text = _inputs()
    m = student.backbone(x, t, text)
    g = torch.Generator().manual_seed(3)
    y, y1 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    student.head = lambda sample, s, r, m, encoder_hidden_states=None: y  # type: ignore[method-assign]
    for n in (1, 2, 4):
        torch.testing.assert_close(student.inner_flow(m, time_grid(n, 10.0, t_max=1.0), y1), y)
        # Wan's grid ends at 0.999: the rollout starts at y1 instead of y_0.999, off by 0.001 (y1 - y)
        torch.testing.assert_close(student.inner_flow(m, time_grid(n, 10.0, t_max=0.999), y1), y + 0.001 * (y1 - y))
    s, r = torch.full((3,), 0.8), torch.full((3,), 0.3)
    y_s = 0.2 * y + 0.8 * y1
    torch.testing.assert_close(student.flow_map(y_s, s, r, m, y1), 0.7 * y + 0.3 * y1)  # f(y_s, s, r) = y_r
    torch.testing.assert_close(student.average_velocity(y_s, s, r, m, y1), y1 - y)


@torch.no_grad()
def test_tmd_sampler_one_step_is_teacher_euler_up_to_the_boundary():
    """M = N = 1: the head sees s = t_1 = 0.999, where it is the teacher, so x0 = x - 0.999 (0.001 y1 + 0.999 v)."""
    teacher = _teacher()
    student = TMDTransformer.from_teacher(teacher, head_blocks=2).eval()
    x, _, text = _inputs()
    y1 = torch.randn_like(x)
    out = tmd_sample(student, x, text, M=1, N=1, inner_noise=[y1])
    v = _teacher_v(teacher, x, torch.full((3,), 0.999), text)
    torch.testing.assert_close(out, x - 0.999 * (0.001 * y1 + 0.999 * v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M,N", [(2, 2), (3, 4)])
@torch.no_grad()
def test_tmd_sampler_is_teacher_euler_on_the_outer_grid_at_init(M, N):
    """At init the head is the teacher evaluated at the inner times; with a time-independent modulation (time MLP
    weights zeroed in the teacher) that is v(x, t_i), and Algorithm 1 must equal M-step Euler on the student grid,
    up to the 0.999 boundary's 0.001 y1 of every rollout."""
    teacher = _teacher()
    with torch.no_grad():
        teacher.condition_embedder.time_embedder.linear_1.weight.zero_()
    student = TMDTransformer.from_teacher(teacher, head_blocks=2).eval()
    x, _, text = _inputs()
    g = torch.Generator().manual_seed(5)
    inner = [torch.randn(x.shape, generator=g) for _ in range(M)]
    out = tmd_sample(student, x, text, M=M, N=N, inner_noise=inner)
    outer, _ = student_grids(M, N)

    def velocity(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = int((outer - float(t[0])).abs().argmin())  # the outer step this Euler step is at
        return 0.001 * inner[i - 1] + 0.999 * _teacher_v(teacher, x_, t, text)

    expected = euler_sample(velocity, x, outer.float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    plain = euler_sample(lambda x_, t: _teacher_v(teacher, x_, t, text), x, outer.float())
    assert (out - plain).abs().max() < 0.05 * plain.abs().max()  # the boundary term is small


@torch.no_grad()
def test_sampler_runs_one_backbone_per_outer_step_and_n_heads():
    student = TMDTransformer.from_teacher(_teacher(), head_blocks=1).eval()
    calls = {"backbone": 0, "head": 0}
    backbone, head = student.backbone, student.head

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    student.backbone, student.head = count("backbone", backbone), count("head", head)  # type: ignore[method-assign]
    x, _, text = _inputs()
    tmd_sample(student, x, text, M=3, N=4)
    assert calls == {"backbone": 3, "head": 12}


def test_effective_nfe_reproduces_the_paper():
    assert effective_nfe(1, 2, 5, 30) == pytest.approx(7 / 6)  # N2H5, Wan 1.3B: 1.17
    assert effective_nfe(2, 2, 5, 30) == pytest.approx(7 / 3)  # 2.33
    assert effective_nfe(1, 4, 5, 40) == pytest.approx(1.375)  # N4H5, Wan 14B
    assert effective_nfe(2, 4, 5, 40) == pytest.approx(2.75)
    assert effective_nfe(50, cfg=True) == 100  # the teacher's 50 x 2


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    teacher = _teacher()
    student = TMDTransformer.from_teacher(teacher, head_blocks=2, fusion="concat")
    torch.nn.init.normal_(student.delta_embedder.linear_2.weight, std=0.1)  # trained-looking new parts
    student.save_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "config.json").is_file()
    assert (tmp_path / "student" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = build_student(pretrained=str(tmp_path / "student"))
    assert loaded.config.head_blocks == 2 and loaded.config.fusion == "concat"
    for (k, v), (k2, v2) in zip(student.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    x, t, text = _inputs()
    torch.testing.assert_close(loaded(x, t, text, sample=x * 0.5, r=t * 0.5), student(x, t, text, sample=x * 0.5,
                                                                                      r=t * 0.5))
    rope = dict(loaded.named_buffers())["wan.rope.freqs_cos"]
    torch.testing.assert_close(rope, dict(student.named_buffers())["wan.rope.freqs_cos"])


@torch.no_grad()
def test_head_reuses_the_backbone_text_and_projects_other_text():
    student = TMDTransformer.from_teacher(_teacher(), head_blocks=2).eval()
    x, t, text = _inputs()
    other = torch.randn_like(text)
    m = student.backbone(x, t, text)
    projected = student.wan.condition_embedder.text_embedder(other)
    with_other = student.head(x, t, t, m, other)
    by_hand = student.head(x, t, t, BackboneOutput(m.hidden_states, projected, m.rotary_emb, m.grid))
    torch.testing.assert_close(with_other, by_hand)
    assert not torch.allclose(with_other, student.head(x, t, t, m, text), atol=1e-4)
    rep = m.repeat(2)
    assert rep.hidden_states.shape[0] == 6 and torch.equal(rep.hidden_states[3:], m.hidden_states)
    sel = m.select(torch.tensor([True, False, True]))
    assert torch.equal(sel.text, m.text[[0, 2]])


def test_inner_flow_is_differentiable_through_every_step():
    """Gradients reach the backbone through the rollout; `detach_steps` changes them only when N > 1."""
    student = TMDTransformer.from_teacher(_teacher(), head_blocks=1)
    torch.nn.init.normal_(student.inner_fusion.proj_out.weight, std=0.1)  # y_s reaches the head
    x, t, text = _inputs()
    y1 = torch.randn_like(x)

    def grads(n: int, detach_steps: bool) -> torch.Tensor:
        student.zero_grad()
        out = student.inner_flow(student.backbone(x, t, text), time_grid(n, 10.0, 0.999), y1, detach_steps)
        out.pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    full = grads(3, False)
    assert student.wan.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0  # the backbone is trained through the head
    assert not torch.allclose(full, grads(3, True))
    torch.testing.assert_close(grads(1, False), grads(1, True))

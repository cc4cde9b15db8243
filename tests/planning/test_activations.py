"""`planning.activations`: one Wan block's saved tensors against autograd (exactly), a Stage-1 forward and the
no-grad working set against the bytes the real toy networks allocate (`planning.TensorBytes`)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning import planning as P
from tmd_lightning.models.wan_parts import embed

MIXED = ["fp32", "bf16"]


def _autocast(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def _saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (parameters excluded)."""
    saved: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("mode", MIXED)
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("heads,ffn", [(4, 512), (2, 192)])
def test_block_saves_equal_autograd(tiny_wan_config: dict, mode: str, trainable: bool, heads: int, ffn: int) -> None:
    """One real Wan block: the bytes autograd saves equal the plan's count exactly (trainable: weights and
    conditioning get gradients; frozen: bf16 network in bf16 mode, only the hidden states get gradients)."""
    config = tiny_wan_config | {"num_attention_heads": heads, "attention_head_dim": 32, "ffn_dim": ffn,
                                "num_layers": 1}
    wan = WanTransformer3DModel(**config)
    if not trainable:
        wan.requires_grad_(False).to(torch.bfloat16 if mode == "bf16" else torch.float32)
    dtype = next(wan.parameters()).dtype
    rows, (frames, height, width), text_len = 2, (3, 4, 5), 7
    x = torch.randn(rows, config["in_channels"], frames, height, width, dtype=dtype)
    with _autocast(mode):
        inputs = embed(wan, x, torch.rand(rows), torch.randn(rows, text_len, config["text_dim"], dtype=dtype))
    hidden = inputs.hidden_states.detach().requires_grad_(True)
    text, modulation = (t.detach().requires_grad_(trainable) for t in (inputs.text, inputs.modulation))

    def forward() -> None:
        with _autocast(mode):
            wan.blocks[0](hidden, text, modulation, inputs.rotary_emb)

    measured = _saved_bytes(forward, list(wan.parameters()))
    sizes = P.Sizes((48, frames, height, width), (frames, height, width), text_len, heads * 32, ffn, heads, 32, 48,
                    config["text_dim"], 1)
    mixed = mode == "bf16"
    casts = 2 * sum(m.weight.numel() for m in wan.blocks[0].modules() if isinstance(m, torch.nn.Linear)) \
        if trainable and mixed else 0  # autocast's bf16 weight copies: the plan's own row
    assert measured == P.block_bytes(sizes, rows, trainable, mixed) \
        + P.call_constant_bytes(sizes, rows, trainable, mixed) + casts


@pytest.mark.parametrize("mode", MIXED)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_stage1_forward_activations_match_measured(toy, toy_nets, mode: str, checkpointing: bool) -> None:
    """The Stage-1 graph (backbone + one head call, with gradients) of the real toy student: the bytes alive at the
    end of the forward against the plan's calls (+ autocast's weight copies in bf16)."""
    cfg, sizes, counts = toy
    student = copy.deepcopy(toy_nets[1])
    if checkpointing:
        student.wan.enable_gradient_checkpointing()
    rows, (C, T, h, w) = 2, sizes.latent
    x, y1 = torch.randn(rows, C, T, h, w), torch.randn(rows, C, T, h, w)
    text, t, s = torch.randn(rows, sizes.text_len, sizes.text_dim), torch.rand(rows), torch.rand(rows)
    with _autocast(mode), P.TensorBytes() as tracker:
        m = student.backbone(x, t, text)
        u = student.average_velocity(y1, s, s / 2, m, y1)
        measured = tracker.live
    mixed, H, L = mode == "bf16", int(cfg.tmd.H), sizes.num_layers
    calls = (P.Call(L - H, rows, True, mixed, embed=True), P.Call(H, rows, True, mixed, heads=1))
    planned = sum(P.call_bytes(sizes, c, checkpointing) for c in calls) + (2 * counts["student"].linear if mixed else 0)
    assert u.requires_grad
    assert planned == pytest.approx(measured, rel=0.06 if checkpointing else 0.02)


@pytest.mark.parametrize("mode", MIXED)
def test_nograd_working_set_matches_measured_peak(toy, toy_nets, mode: str) -> None:
    _, sizes, _ = toy
    teacher = copy.deepcopy(toy_nets[0]).requires_grad_(False).to(torch.bfloat16 if mode == "bf16" else torch.float32)
    dtype, rows, (C, T, h, w) = next(teacher.parameters()).dtype, 4, sizes.latent
    x, text = torch.randn(rows, C, T, h, w, dtype=dtype), torch.randn(rows, sizes.text_len, sizes.text_dim, dtype=dtype)
    with torch.no_grad(), _autocast(mode), P.TensorBytes() as tracker:
        teacher(x, timestep=torch.rand(rows) * 1000, encoder_hidden_states=text, return_dict=False)
    assert P.working_set_bytes(sizes, rows, mode == "bf16") == pytest.approx(tracker.peak, rel=0.05)

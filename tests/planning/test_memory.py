"""`planning.memory`: weights, gradients and AdamW states against a real optimizer step, LoRA's trainable share,
and FSDP2's gathers and autocast copies under the bf16 MixedPrecisionPolicy (runtime/parallel.py) by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from plan_configs import fsdp14_plan

from tmd_lightning import planning as P
from tmd_lightning.models import Discriminator


def _state_bytes(nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> int:
    params = [p for net in nets for p in net.parameters() if p.requires_grad]
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(p.nbytes + p.grad.nbytes for p in params) + sum(t.nbytes for t in state)


def _planned(cfg, counts, sizes, stage: str, mode: str) -> int:
    setup = P.Setup("single", 1, P.parse_precision(cfg.trainer.precision))
    rows = P.stage_memory(stage, mode, counts, sizes, setup, cfg)
    return int(rows["trainable weights"] + rows["gradients"] + rows["AdamW states"])


@pytest.mark.parametrize("stage", ["adapt_head", "distill", "distill_dmd2"])
def test_weights_grads_adamw_bytes_equal_a_real_step(toy, toy_nets, stage: str) -> None:
    cfg, sizes, counts = toy
    teacher = toy_nets[0]
    student = copy.deepcopy(toy_nets[1] if stage != "distill_dmd2" else teacher)
    nets = [student]
    if stage != "adapt_head":
        dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        disc = Discriminator(dim, tuple(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim))
        nets += [copy.deepcopy(teacher), disc]
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-5) for net in nets]
    C, T, h, w = sizes.latent
    x, text, t = torch.randn(1, C, T, h, w), torch.randn(1, sizes.text_len, sizes.text_dim), torch.rand(1)
    loss = (student(x, t, text) if stage != "distill_dmd2" else student(x, t * 1000, text, return_dict=False)[0]).sum()
    if stage != "adapt_head":
        loss = loss + nets[1](x, t * 1000, text, return_dict=False)[0].sum()
        loss = loss + sum(o.sum() for o in nets[2]([torch.randn(1, dim, T, h, w)] * len(cfg.model.disc_blocks)))
    loss.backward()
    for opt in optimizers:
        opt.step()
    assert _state_bytes(nets, optimizers) == _planned(cfg, counts, sizes, stage, "full")


def test_lora_fake_score_trains_only_the_adapter(toy) -> None:
    cfg, sizes, counts = toy
    setup = P.Setup("single", 1, P.parse_precision("32-true"))
    full, lora = (P.stage_memory("distill", m, counts, sizes, setup, cfg) for m in ("full", "LoRA fake"))
    assert full["gradients"] - lora["gradients"] == 4 * (counts["teacher"].params - counts["teacher"].lora)
    assert full["frozen weights (teacher, LoRA bases)"] == lora["frozen weights (teacher, LoRA bases)"]


D14, F14, L14, H = 5120, 13824, 40, 5
# one Wan 14B block by hand: 8 attention Linear, q/k norms, FFN, affine norm2, scale_shift_table
BLOCK14 = 8 * D14 * D14 + 8 * D14 + 4 * D14 + 2 * D14 * F14 + F14 + D14 + 2 * D14 + 6 * D14
BLOCK14_LINEAR = 8 * (D14 * D14 + D14) + (D14 * F14 + F14) + (F14 * D14 + D14)  # its 8 attention + 2 FFN Linear layers


def test_fsdp_bf16_policy_gathers_and_copies_match_hand_computation(tmp_path: Path) -> None:
    bf16, fp32 = fsdp14_plan(tmp_path), fsdp14_plan(tmp_path, "fsdp_param_dtype=null")
    c = bf16["counts"]
    assert c["teacher"].block == BLOCK14 and c["teacher"].block_linear == BLOCK14_LINEAR and c["teacher"].blocks == L14
    gathers = "DDP buckets / FSDP gathers"
    # bf16: 2 gathered bf16 blocks + the bf16 unsharded gradient + its float32 copy for the reduce-scatter
    assert bf16["memory"][("distill", "full")][gathers] == BLOCK14 * (2 * 2 + 2 + 4)
    assert fp32["memory"][("distill", "full")][gathers] == BLOCK14 * (2 * 4 + 4)  # float32 gathers and gradient
    # Stage 1 gathers its head blocks in float32 (fd_full_precision): the float32 figure
    assert bf16["memory"][("adapt_head", "full")][gathers] == BLOCK14 * 12
    copies = "autocast bf16 weight copies"
    s, t, d = c["student"], c["teacher"], c["discriminator"]
    assert bf16["memory"][("distill", "full")][copies] == 0  # bf16 gathered weights: nothing for autocast to copy
    assert fp32["memory"][("distill", "full")][copies] == 2 * max(s.linear + d.linear, t.linear + d.linear)
    # Stage 1: H float32 head blocks + the root unit's Linear weights (patch, text, time embedders, Δ, fusion, head)
    root = s.linear - L14 * BLOCK14_LINEAR
    assert bf16["memory"][("adapt_head", "full")][copies] == 2 * (H * BLOCK14_LINEAR + root)
    assert fp32["memory"][("adapt_head", "full")][copies] == 2 * s.linear
    # master weights stay float32 and sharded; the frozen teacher is bf16 and sharded
    full = bf16["memory"][("distill", "full")]
    assert full["trainable weights"] == (s.params + t.params + d.params) * 4 / 8
    assert full["frozen weights (teacher, LoRA bases)"] == t.params * 2 / 8
    for ckpt in ("total, checkpointing", "total, no checkpointing"):  # the totals differ by exactly those two rows
        assert fp32["memory"][("distill", "full")][ckpt] - full[ckpt] == pytest.approx(
            fp32["memory"][("distill", "full")][copies] + fp32["memory"][("distill", "full")][gathers]
            - full[copies] - full[gathers])

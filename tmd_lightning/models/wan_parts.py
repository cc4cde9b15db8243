"""Wan's forward pass in pieces, so the student, the discriminator and the teacher's features share one copy.

diffusers' `WanTransformer3DModel.forward` runs embedding, all blocks and the output head in one call; TMD needs the
blocks split (backbone / head) and the frozen teacher's hidden states at a few blocks (discriminator features,
stopping at the last block needed). These functions call the model's own submodules in `forward`'s order; a test
checks that embed -> all blocks -> output head equals `forward`.

Inputs are cast here, and only here, to the dtype the model computes in (as diffusers' `WanPipeline` casts latents
and text to the transformer's dtype), so a bf16 model takes the float32 latents and text the samplers and stages
hold; times stay float32 (Wan keeps its time embedder in float32).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel
from torch import nn


@dataclass
class WanInputs:
    """Embedded inputs of one Wan call: tokens, block modulation, projected text, rotary table, post-patch grid."""

    hidden_states: torch.Tensor  # (B, tokens, D)
    modulation: torch.Tensor  # (B, 6, D): the blocks' shared time modulation
    temb: torch.Tensor  # (B, D): the time embedding the output head is modulated by
    text: torch.Tensor  # (B, L_text, D)
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int, int]  # (frames, height, width) after patching


def compute_dtype(wan: nn.Module) -> torch.dtype:
    """The dtype a Wan model computes in, which its latents and text are cast to: its patch embedding's (bf16 in a
    bf16 model; diffusers keeps only rope, the time embedder, norms and modulation tables in float32). A LoRA fake
    score (an `AdapterView`) answers for the model it runs."""
    return getattr(wan, "host", wan).patch_embedding.weight.dtype


def wan_velocity(wan: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Wan's velocity `v(x_t, t, c)` for t in [0, 1] (timestep 1000 t), returned in float32 (or wider) whatever
    dtype the model computes in: the samplers integrate, and the losses compare, in float32."""
    dtype = compute_dtype(wan)
    v = wan(x.to(dtype), timestep=t * 1000.0, encoder_hidden_states=text.to(dtype), return_dict=False)[0]
    return v.to(torch.promote_types(v.dtype, torch.float32))


def embed(wan: WanTransformer3DModel, hidden_states: torch.Tensor, t: torch.Tensor,
          encoder_hidden_states: torch.Tensor) -> WanInputs:
    """Patch + rope + text/time embedding at time t in [0, 1] (Wan is called with 1000 t)."""
    dtype = compute_dtype(wan)
    hidden_states, encoder_hidden_states = hidden_states.to(dtype), encoder_hidden_states.to(dtype)
    _, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = wan.config.patch_size
    rotary = wan.rope(hidden_states)
    tokens = wan.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    temb, modulation, text, _ = wan.condition_embedder(t * 1000.0, encoder_hidden_states)
    return WanInputs(tokens, modulation.unflatten(1, (6, -1)), temb, text, rotary,
                     (frames // p_t, height // p_h, width // p_w))


def run_blocks(wan: WanTransformer3DModel, blocks: nn.ModuleList | list, hidden: torch.Tensor, text: torch.Tensor,
               modulation: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The given Wan blocks in order, with diffusers' gradient checkpointing when the model has it enabled."""
    checkpointing = torch.is_grad_enabled() and wan.gradient_checkpointing
    for block in blocks:
        if checkpointing:
            hidden = wan._gradient_checkpointing_func(block, hidden, text, modulation, rotary)
        else:
            hidden = block(hidden, text, modulation, rotary)
    return hidden


def output_head(wan: WanTransformer3DModel, hidden: torch.Tensor, temb: torch.Tensor,
                grid: tuple[int, int, int]) -> torch.Tensor:
    """Wan's output norm (modulated by `temb`), projection and unpatchify: tokens -> (B, C, F, H, W)."""
    shift, scale = (wan.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (wan.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = wan.proj_out(hidden)
    (f, h, w), (p_t, p_h, p_w) = grid, wan.config.patch_size
    hidden = hidden.reshape(hidden.shape[0], f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def block_features(wan: WanTransformer3DModel, hidden_states: torch.Tensor, t: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, indices: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
    """Hidden states after blocks `indices` (0-based), each reshaped to (B, D, F, H, W); stops after the last one."""
    if not indices or min(indices) < 0 or max(indices) >= wan.config.num_layers:
        raise ValueError(f"feature blocks {list(indices)} must lie in [0, {wan.config.num_layers - 1}]")
    inputs = embed(wan, hidden_states, t, encoder_hidden_states)
    hidden, wanted, features = inputs.hidden_states, set(indices), {}
    for i in range(max(indices) + 1):
        hidden = run_blocks(wan, [wan.blocks[i]], hidden, inputs.text, inputs.modulation, inputs.rotary_emb)
        if i in wanted:
            f, h, w = inputs.grid
            features[i] = hidden.unflatten(1, (f, h, w)).permute(0, 4, 1, 2, 3)
    return [features[i] for i in indices]


def forward_skipping_blocks(wan: WanTransformer3DModel, hidden_states: torch.Tensor, t: torch.Tensor,
                            encoder_hidden_states: torch.Tensor, skip: Collection[int]) -> torch.Tensor:
    """Wan's output (velocity) with the blocks `skip` (0-based) left out: embed, the other blocks in order, output head;
    returned in float32 (or wider), as `wan_velocity`.

    The forward pass of skip-layer guidance (SLG), which runs a guidance branch with some blocks skipped; with `skip`
    empty it equals `wan(...)`.
    """
    bad = [i for i in skip if not 0 <= i < wan.config.num_layers]
    if bad:
        raise ValueError(f"skipped blocks {bad} must lie in [0, {wan.config.num_layers - 1}]")
    inputs = embed(wan, hidden_states, t, encoder_hidden_states)
    kept = [block for i, block in enumerate(wan.blocks) if i not in set(skip)]
    hidden = run_blocks(wan, kept, inputs.hidden_states, inputs.text, inputs.modulation, inputs.rotary_emb)
    v = output_head(wan, hidden, inputs.temb, inputs.grid)
    return v.to(torch.promote_types(v.dtype, torch.float32))

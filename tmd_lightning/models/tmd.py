"""The TMD student (docs/method.md §3): a Wan transformer split into a main backbone and a flow head.

Notation (used in config and log names too):
    L  blocks of the teacher; the backbone runs blocks 0 .. L-H-1 once per outer step,
    H  flow-head blocks (the last H of the teacher), run N times per outer step,
    t  outer time (the video's noise level), s / r the inner flow map's start / end time (r <= s).

Every Wan piece is diffusers' own module, held in `self.wan` (a `WanTransformer3DModel`), and called here in the
order Wan's `forward` calls them; only the split and the three new parts are written by hand, because no library
provides a transformer cut in two with a second time input: the Δ-embedder (a copy of Wan's time MLP for `s - r`
whose last layer starts at zero), the inner-sample fusion ("gated" or "concat"), and the flow-map algebra.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from tmd_lightning.models.wan_parts import compute_dtype, embed, output_head, run_blocks

FUSIONS = ("gated", "concat")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) times -> (B, 1, 1, 1, 1), to scale video-shaped tensors per row."""
    return x.view(-1, *([1] * 4))


@contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    """Autocast off: the head's time path and inner-sample path compute in float32 under `bf16-mixed` too."""
    with torch.autocast(device.type, enabled=False):
        yield


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32, or `dtype` when wider (float64 weights compute in float64)."""
    return torch.promote_types(dtype, torch.float32)


def _in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` with x cast to the module's weight dtype (float32 for the modules kept in float32), as float32
    (or wider)."""
    dtype = next(module.parameters()).dtype
    return module(x.to(dtype)).to(_wide(dtype))


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in float32 (or the weights' wider dtype) whatever the weights' dtype (a bf16 layer's weights are
    upcast for this call)."""
    dtype = _wide(layer.weight.dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


def _conv32(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` in float32 (or the weights' wider dtype) whatever the weights' dtype."""
    dtype = _wide(conv.weight.dtype)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return F.conv3d(x.to(dtype), conv.weight.to(dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@dataclass
class BackboneOutput:
    """What the backbone hands the head: the token features `m` and the per-call context the head reuses.

    `hidden_states` is `m`, shape (B, tokens, D). The projected text, the rotary embedding and the post-patch grid
    are kept so that N head calls recompute none of them.
    """

    hidden_states: torch.Tensor
    text: torch.Tensor
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int, int]
    encoder_hidden_states: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def repeat(self, k: int) -> BackboneOutput:
        """k copies stacked along the batch (`[m, m, ..]`), e.g. for the two finite-difference head calls."""
        return replace(self, hidden_states=self.hidden_states.repeat(k, 1, 1), text=self.text.repeat(k, 1, 1),
                       encoder_hidden_states=None)

    def select(self, index: torch.Tensor) -> BackboneOutput:
        """The rows `index` (a bool mask or integer indices)."""
        return replace(self, hidden_states=self.hidden_states[index], text=self.text[index],
                       encoder_hidden_states=None)

    def detach(self) -> BackboneOutput:
        return replace(self, hidden_states=self.hidden_states.detach(), text=self.text.detach())

    def to(self, dtype: torch.dtype) -> BackboneOutput:
        """`m` and the projected text in `dtype` (e.g. float32 for head calls with autocast off)."""
        return replace(self, hidden_states=self.hidden_states.to(dtype), text=self.text.to(dtype),
                       encoder_hidden_states=None)


class GatedFusion(nn.Module):
    """`z = m + σ(α) · W_out GELU(W_in (LN(h)(1 + scale_s) + shift_s))`, with `W_out = 0` at init, so `z = m`.

    scale/shift are Wan's shared modulation of the head's time embedding (its first two chunks) plus a learnable
    offset, as Wan's blocks add their `scale_shift_table`. A bf16 student keeps this module in float32, as Wan keeps
    its time embedder: it computes in its weights' dtype (under autocast, in autocast's) and adds its output to `m`
    in float32 before casting to m's dtype.
    """

    def __init__(self, dim: int, hidden_dim: int, gate_init: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.modulation_offset = nn.Parameter(torch.zeros(1, 2, dim))
        self.proj_in = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(hidden_dim, dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, m: torch.Tensor, h: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation_offset.float() + modulation[:, :2].float()).chunk(2, dim=1)
        x = self.norm(h.float()) * (1 + scale) + shift
        out = _in_own_dtype(self.proj_out, self.act(_in_own_dtype(self.proj_in, x)))
        return (m.float() + torch.sigmoid(self.gate.float()) * out).to(m.dtype)


class ConcatFusion(nn.Module):
    """`z = Linear([m, h])`, identity on the m half and N(0, std²) on the h half (the paper's init)."""

    def __init__(self, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.dim, self.init_std = dim, init_std
        self.proj = nn.Linear(2 * dim, dim)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            self.proj.weight[:, : self.dim].copy_(torch.eye(self.dim))
            nn.init.normal_(self.proj.weight[:, self.dim :], std=self.init_std)
            nn.init.zeros_(self.proj.bias)

    def forward(self, m: torch.Tensor, h: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """In the projection's dtype (float32 in a bf16 student), returned in m's dtype."""
        return _in_own_dtype(self.proj, torch.cat([m.float(), h.float()], dim=-1)).to(m.dtype)


class TMDTransformer(ModelMixin, ConfigMixin):
    """Decoupled student: `backbone(x_t, t, c) -> m` and `head(y_s, s, r, m, c) -> velocity-space output`.

    Build it with `TMDTransformer.from_teacher(teacher, head_blocks=H)`; save and load it like any diffusers model
    (`save_pretrained` / `from_pretrained`). The inner flow runs from `y1 ~ N(0, I)` at s = 1 toward the target
    `y = ε - x` at s = 0, `y_s = (1 - s) y + s y1`; the head predicts `y`.

    Args:
        wan_config: the teacher's `WanTransformer3DModel` config.
        head_blocks: H, the number of final teacher blocks that form the flow head.
        fusion: how the inner sample enters the head, "gated" (exact teacher at init) or "concat" (the paper's).
        fusion_dim: hidden width of the gated fusion block (default: the model width D).
        fusion_gate_init: α at init; σ(α) scales the gated block (its output is zero at init anyway).
        concat_init_std: init std of the concat fusion's h half.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["WanTransformerBlock"]
    # diffusers' rule for Wan, plus the new parts, which take the inner time and sample (see `head`)
    _keep_in_fp32_modules = ["rope", "time_embedder", "delta_embedder", "inner_fusion", "scale_shift_table", "norm1",
                             "norm2", "norm3"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm", "delta_embedder"]

    @register_to_config
    def __init__(self, wan_config: dict[str, Any], head_blocks: int = 5, fusion: str = "gated",
                 fusion_dim: int | None = None, fusion_gate_init: float = 0.0, concat_init_std: float = 0.01) -> None:
        super().__init__()
        self.wan = WanTransformer3DModel(**wan_config)
        num_layers, dim = self.wan.config.num_layers, self.inner_dim
        if not 1 <= head_blocks < num_layers:
            raise ValueError(f"head_blocks (H) must be in [1, {num_layers - 1}] for a {num_layers}-block teacher, "
                             f"got {head_blocks}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.delta_embedder = copy.deepcopy(self.wan.condition_embedder.time_embedder)
        nn.init.zeros_(self.delta_embedder.linear_2.weight)
        nn.init.zeros_(self.delta_embedder.linear_2.bias)
        if fusion == "gated":
            self.inner_fusion = GatedFusion(dim, fusion_dim or dim, fusion_gate_init, self.wan.config.eps)
        else:
            self.inner_fusion = ConcatFusion(dim, concat_init_std)

    @property
    def inner_dim(self) -> int:
        return self.wan.config.num_attention_heads * self.wan.config.attention_head_dim

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters the teacher does not have: the Δ-embedder's and the inner fusion's."""
        return [*self.delta_embedder.parameters(), *self.inner_fusion.parameters()]

    @property
    def num_layers(self) -> int:
        """L, the teacher's block count."""
        return self.wan.config.num_layers

    @property
    def head_blocks(self) -> int:
        """H."""
        return self.config.head_blocks

    @classmethod
    def from_teacher(cls, teacher: WanTransformer3DModel, head_blocks: int = 5, fusion: str = "gated",
                     **kwargs: Any) -> TMDTransformer:
        """A student whose backbone + head reproduce `teacher` at init (exactly, for the gated fusion).

        The teacher is copied, never shared: training the student leaves it untouched. The copy is built on the meta
        device and filled from the teacher, so a 14B teacher is not first initialised at random.
        """
        wan_config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
        device = next(teacher.parameters()).device
        with torch.device("meta"):
            student = cls(wan_config=wan_config, head_blocks=head_blocks, fusion=fusion, **kwargs)
        student.to_empty(device=device)
        student.wan.load_state_dict(teacher.state_dict(), strict=True)
        for name, buffer in teacher.named_buffers():  # non-persistent (rope tables) are not in the state dict
            module_name, _, attr = name.rpartition(".")
            setattr(student.wan.get_submodule(module_name), attr, buffer.detach().clone())
        student.delta_embedder.load_state_dict(teacher.condition_embedder.time_embedder.state_dict())
        nn.init.zeros_(student.delta_embedder.linear_2.weight)
        nn.init.zeros_(student.delta_embedder.linear_2.bias)
        _init_fusion(student.inner_fusion, student.config.fusion_gate_init)
        return student

    # -- the two halves -------------------------------------------------------------------------------------------
    def backbone(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> BackboneOutput:
        """`m_θ(x_t, t, c)`: patch + text/time embedding (Wan timestep 1000 t) + blocks 0 .. L-H-1.

        `timestep` is the outer t in [0, 1], one per row.
        """
        inputs = embed(self.wan, hidden_states, timestep, encoder_hidden_states)
        hidden = run_blocks(self.wan, self.wan.blocks[: self.num_layers - self.head_blocks], inputs.hidden_states,
                            inputs.text, inputs.modulation, inputs.rotary_emb)
        return BackboneOutput(hidden, inputs.text, inputs.rotary_emb, inputs.grid, encoder_hidden_states)

    def head_embedding(self, s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's time conditioning, float32: `e = time_embedder(sin(1000 s)) + Δ_embedder(sin(1000 (s - r)))`
        (B, D), which modulates the output head, and the blocks' modulation `time_proj(act(e))` (B, 6, D).

        Wan casts its time embedding to the compute dtype before `time_proj`; here `time_proj` runs on the float32
        embedding (a bf16 student's weights upcast: one (D, 6D) product per sample), so that times a few 1e-3 apart,
        Stage 1's s ± δ, still give different modulations in a bf16 student.
        """
        embedder = self.wan.condition_embedder
        e = _in_own_dtype(embedder.time_embedder, embedder.timesteps_proj(s * 1000.0))
        e = e + _in_own_dtype(self.delta_embedder, embedder.timesteps_proj((s - r) * 1000.0))
        return e, _linear32(embedder.time_proj, embedder.act_fn(e)).unflatten(1, (6, -1))

    def head(self, sample: torch.Tensor, s: torch.Tensor, r: torch.Tensor, m: BackboneOutput,
             encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """`head_θ(y_s, s, r; m, c)`: fusion + blocks L-H .. L-1 + Wan's output head; shaped like `sample`, in the
        student's compute dtype.

        The text projection from the backbone call is reused when `encoder_hidden_states` is the tensor the
        backbone saw (or None); any other text is projected afresh. The inner sample and the times are embedded in
        float32 (autocast off), so the step of Stage 1's finite difference, ±δ·ṽ (one or two bf16 ulps of y_s) and
        s ± δ, is not rounded away before the fusion; the fused tokens enter the blocks in the compute dtype.
        """
        wan = self.wan
        if encoder_hidden_states is None or encoder_hidden_states is m.encoder_hidden_states:
            text = m.text
        else:
            text = wan.condition_embedder.text_embedder(encoder_hidden_states.to(compute_dtype(wan)))
        with _float32(sample.device):  # per-sample time MLPs and a (C·p -> D) projection: float32 costs nothing
            e, modulation = self.head_embedding(s, r)
            h = _conv32(wan.patch_embedding, sample).flatten(2).transpose(1, 2)
        z = self.inner_fusion(m.hidden_states, h, modulation)
        z = run_blocks(wan, wan.blocks[self.num_layers - self.head_blocks :], z, text, modulation, m.rotary_emb)
        return output_head(wan, z, e, m.grid)

    # -- flow-map algebra (docs/method.md §3) ----------------------------------------------------------------------
    def average_velocity(self, sample: torch.Tensor, s: torch.Tensor, r: torch.Tensor, m: BackboneOutput,
                         inner_noise: torch.Tensor) -> torch.Tensor:
        """`u_θ(y_s, s, r) = y1 - head_θ(y_s, s, r)`, the average inner velocity from s to r."""
        return inner_noise - self.head(sample, s, r, m)

    def flow_map(self, sample: torch.Tensor, s: torch.Tensor, r: torch.Tensor, m: BackboneOutput,
                 inner_noise: torch.Tensor) -> torch.Tensor:
        """`f_θ(y_s, s, r) = y_s - (s - r) u_θ`: jumps the inner sample from s to r (the paper prints `+`; wrong)."""
        return sample - _rows(s - r).to(sample.dtype) * self.average_velocity(sample, s, r, m, inner_noise)

    def inner_flow(self, m: BackboneOutput, inner_grid: torch.Tensor, inner_noise: torch.Tensor,
                   detach_steps: bool = False) -> torch.Tensor:
        """`InnerFlow(m)`: from `y1 = inner_noise` at s_N down the grid to s_0 = 0; returns ŷ ≈ ε - x.

        Differentiable through every step (Stage 2 backpropagates through all N); `detach_steps` cuts the graph
        between steps (the paper's "no rollout" ablation).
        """
        y = inner_noise
        batch = inner_noise.shape[0]
        inner_grid = inner_grid.to(device=y.device, dtype=torch.float32)  # once, not per step (no-op when there)
        for j in range(len(inner_grid) - 1, 0, -1):
            s, r = inner_grid[j].expand(batch), inner_grid[j - 1].expand(batch)
            y = self.flow_map(y.detach() if detach_steps else y, s, r, m, inner_noise)
        return y

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                sample: torch.Tensor | None = None, s: torch.Tensor | None = None,
                r: torch.Tensor | None = None) -> torch.Tensor:
        """One backbone + one head call; with no inner sample it is the teacher-equivalent `head(·, t, t)`.

        Wrapping strategies (DDP, FSDP) see the whole student through this method.
        """
        m = self.backbone(hidden_states, timestep, encoder_hidden_states)
        s = timestep if s is None else s
        return self.head(hidden_states if sample is None else sample, s, s if r is None else r, m)


def _init_fusion(fusion: nn.Module, gate_init: float) -> None:
    """Initialises the fusion parameters after `to_empty` (which leaves memory uninitialised)."""
    for module in fusion.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    if isinstance(fusion, GatedFusion):
        nn.init.zeros_(fusion.modulation_offset)
        with torch.no_grad():
            fusion.gate.fill_(gate_init)
    fusion.reset_new_parameters()


def build_student(teacher: str | None = None, teacher_config: dict[str, Any] | None = None, head_blocks: int = 5,
                  fusion: str = "gated", pretrained: str | None = None, **kwargs: Any) -> TMDTransformer:
    """The student for a stage: a saved `TMDTransformer` folder (`pretrained`), else built from the teacher
    (a local diffusers folder `teacher`, or `teacher_config` for a random tiny one in tests)."""
    if pretrained is not None:
        from tmd_lightning.models.rank0 import skip_weights

        if skip_weights():  # FSDP2, rank > 0: shapes only; shard_stage fills the shards from rank 0
            with torch.device("meta"):
                return TMDTransformer.from_config(TMDTransformer.load_config(str(pretrained)))
        return TMDTransformer.from_pretrained(str(pretrained), local_files_only=True)
    from tmd_lightning.models.teacher import load_transformer

    return TMDTransformer.from_teacher(load_transformer(pretrained=teacher, config=teacher_config),
                                       head_blocks=head_blocks, fusion=fusion, **kwargs)

"""Activations: the bytes autograd keeps for backward in the network calls of one training iteration.

A Wan block's saved tensors are counted from diffusers' `WanTransformerBlock.forward` (`BLOCK_SAVES`, exact against
autograd in tests/planning/test_activations.py); the parts around the blocks (embeddings, output and flow heads,
LoRA down-projections), the no-grad working set and the discriminator heads are estimates. An `Iteration` is the
calls whose activations coexist; `iteration_bytes` is its peak with or without activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tmd_lightning.planning.shapes import Sizes


@dataclass(frozen=True)
class BlockSaves:
    """What autograd keeps for backward in one Wan block call, counted from diffusers' `WanTransformerBlock.forward`
    with a fused attention kernel (q, k, v, output and log-sum-exp are kept; never an S x S matrix).

    Per token: `d32` float32 and `d16` bf16 tensors of width D, `f` compute-dtype tensors of width F (plus 9 float32
    norm statistics and 2 x heads float32 log-sum-exps); per text token and block: `t32` / `t16` tensors of width D
    and `ts` float32 scalars; `shared_text`: the text input of the K/V projections, kept once per network call.
    """

    d32: int
    d16: int
    f: int
    t32: int
    t16: int
    ts: int
    shared_text: int


# (trainable, mixed) -> saves. trainable: the block's weights and its time/text conditioning get gradients (student,
# fake score); else frozen, the gradient only flows through (the teacher on the GAN path). mixed: bf16 activations
# (autocast over float32 weights, or a bf16 network). Checked exactly against real blocks in
# tests/planning/test_activations.py.
BLOCK_SAVES = {
    (True, False): BlockSaves(d32=22, d16=0, f=2, t32=4, t16=0, ts=1, shared_text=1),
    (True, True): BlockSaves(d32=12, d16=10, f=2, t32=2, t16=2, ts=1, shared_text=1),
    (False, False): BlockSaves(d32=12, d16=0, f=1, t32=2, t16=0, ts=0, shared_text=0),
    (False, True): BlockSaves(d32=6, d16=6, f=1, t32=0, t16=2, ts=0, shared_text=0),
}


def block_bytes(s: Sizes, rows: int, trainable: bool, mixed: bool) -> int:
    """Bytes kept for backward by one Wan block call on `rows` videos (weights and autocast copies excluded)."""
    k, low = BLOCK_SAVES[(trainable, mixed)], (2 if mixed else 4)
    per_token = 4 * k.d32 * s.dim + 2 * k.d16 * s.dim + low * k.f * s.ffn + 4 * (9 + 2 * s.heads)
    per_text = 4 * k.t32 * s.dim + 2 * k.t16 * s.dim + 4 * k.ts
    per_row = s.tokens * per_token + s.text_len * per_text + 4 * 8 * s.dim  # + the block's 6 + 2 modulation rows
    return rows * per_row + (8 * s.dim if mixed and not trainable else 0)  # + 2 norm weights cast to float32


def call_constant_bytes(s: Sizes, rows: int, trainable: bool, mixed: bool) -> int:
    """Kept once per network call: the rotary table (cos, sin; bf16 in a bf16 network) and the shared text input."""
    low = 2 if mixed else 4
    rope = 2 * s.tokens * s.head_dim * (2 if mixed and not trainable else 4)
    return rope + rows * s.text_len * s.dim * low * BLOCK_SAVES[(trainable, mixed)].shared_text


@dataclass(frozen=True)
class Call:
    """A network call whose activations are kept for backward: `blocks` Wan blocks on `rows` videos.

    `embed`: the patch and text embeddings train (student, fake score); `heads`: TMD flow-head calls in it (inner
    fusion + output head each); `output_head`: Wan's output head (full Wan calls); `lora`: adapted Linear layers
    per block (rank `rank`); `frozen_fp32_linear`: Linear parameters of a frozen float32 base (a LoRA student's)
    whose autocast bf16 casts autograd keeps.
    """

    blocks: int
    rows: int
    trainable: bool
    mixed: bool
    embed: bool = False
    heads: int = 0
    output_head: bool = False
    lora: int = 0
    rank: int = 0
    frozen_fp32_linear: int = 0


def extras_bytes(s: Sizes, call: Call) -> int:
    """Estimates for the parts around the blocks (validated together with the blocks,
    tests/planning/test_activations.py): patch and text embeddings, Wan's output head (fp32 norm input and output +
    projection input), the gated inner fusion (fp32 norm input and output + three compute-dtype tensors of width D)
    and the LoRA down-projections."""
    low = 2 if call.mixed else 4
    per_token = 0
    if call.embed:
        per_token += s.patch_in * low
    per_token += (8 * s.dim + low * s.dim) * (call.heads + int(call.output_head))  # output head(s)
    per_token += (8 * s.dim + 3 * low * s.dim + s.patch_in * low) * call.heads  # inner fusion + patch embedding
    per_token += call.lora * call.rank * low * call.blocks
    text = s.text_len * (s.text_dim + 2 * s.dim) * low if call.embed else 0
    return call.rows * (s.tokens * per_token + text)


def call_bytes(s: Sizes, call: Call, checkpointing: bool) -> int:
    """Activations one call keeps for backward, plus a backbone call's output `m` (kept by its caller). With
    checkpointing each block keeps only its input (the residual stream, compute dtype); the recomputation peak is
    added per iteration (`iteration_bytes`)."""
    low = 2 if call.mixed else 4
    residual = call.rows * s.tokens * s.dim * low
    if checkpointing:
        blocks = call.blocks * residual
    else:
        blocks = call.blocks * block_bytes(s, call.rows, call.trainable, call.mixed) + 2 * call.frozen_fp32_linear
    output = residual if call.embed and not (call.heads or call.output_head) else 0  # a backbone's m, kept
    return blocks + output + call_constant_bytes(s, call.rows, call.trainable, call.mixed) + extras_bytes(s, call)


def working_set_bytes(s: Sizes, rows: int, mixed: bool) -> int:
    """Peak of a no-grad Wan forward on `rows` videos (the teacher's CFG pair, the fake score's VSD call): the
    larger of the FFN phase (2 F-wide + 4 D-wide compute tensors) and the residual update (3 fp32 + 6 compute
    D-wide), per token; compared with measured peaks in tests/planning/test_activations.py."""
    low = 2 if mixed else 4
    per_token = max(2 * low * s.ffn + 4 * low * s.dim, 12 * s.dim + 6 * low * s.dim)
    return rows * s.tokens * per_token


def discriminator_bytes(s: Sizes, heads: int, hidden: int, rows: int, mixed: bool) -> int:
    """Conv3D heads on teacher features (`models.discriminator.ConvHead`): per head the feature map, its
    compute-dtype cast and the GroupNorm output at every token, then each convolution's output, SiLU output and
    cast at 1/4 (stride (1, 2, 2)) and 1/32 (stride 2) of the tokens. An estimate, not measured."""
    low = 2 if mixed else 4
    per_token = (2 * low + 4) * s.dim + (3 * 4 + low) * hidden * (1 / 4 + 1 / 32)
    return int(rows * s.tokens * heads * per_token)


@dataclass(frozen=True)
class Iteration:
    """One kind of training iteration: the calls whose activations coexist, the largest no-grad forward that
    runs while they are alive, the discriminator's rows, and the trainable networks run with gradients."""

    calls: tuple[Call, ...]
    nograd_rows: int
    nograd_mixed: bool
    disc_rows: int = 0
    grad_networks: tuple[str, ...] = ()


def iteration_bytes(s: Sizes, it: Iteration, checkpointing: bool, disc: tuple[int, int]) -> int:
    """Activations of one iteration: every call's saved tensors, the discriminator's, the largest no-grad
    working set and, with checkpointing, one block recomputed in full during backward."""
    total = sum(call_bytes(s, c, checkpointing) for c in it.calls)
    total += discriminator_bytes(s, *disc, it.disc_rows, it.calls[0].mixed) if it.disc_rows else 0
    total += working_set_bytes(s, it.nograd_rows, it.nograd_mixed)
    if checkpointing:
        total += max(block_bytes(s, c.rows, c.trainable, c.mixed) + 2 * c.frozen_fp32_linear // max(c.blocks, 1)
                     for c in it.calls)
    return total

"""The memory model: per-GPU bytes of one (stage, mode) column, row by row, and its peak per iteration kind.

Byte conventions. Lightning's `bf16-mixed` keeps trainable parameters in float32 (they are the master weights, no
second copy), gradients in float32 and AdamW's two moments in float32 (16 bytes per trainable parameter, plus a
4-byte `step` per parameter tensor), and runs the forward under bf16 autocast. The frozen teacher is held in
`frozen_dtype` (bf16). FSDP divides parameters, gradients, optimizer states and the teacher by the world size; DDP
replicates everything. Under FSDP2 with `fsdp_param_dtype=bfloat16` (the `MixedPrecisionPolicy` that trainer=fsdp
applies) the float32 master shards are gathered in bf16, so autocast copies nothing (Stage 1's float32 head blocks
excepted). docs/plan.md gives every formula and what it is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from tmd_lightning.planning.activations import Iteration, iteration_bytes
from tmd_lightning.planning.counts import Counts
from tmd_lightning.planning.iterations import MODES, iterations
from tmd_lightning.planning.run_setup import Precision, Setup
from tmd_lightning.planning.shapes import Sizes
from tmd_lightning.planning.units import dtype_bytes


@dataclass(frozen=True)
class Member:
    """A network held by a stage: `trainable` parameters get gradients and AdamW; `frozen` ones are held in
    `frozen_bytes` per parameter; `shard` says whether FSDP divides it."""

    name: str
    trainable: int
    tensors: int
    frozen: int
    frozen_bytes: int
    shard: bool = True


def members(stage: str, mode: str, c: dict[str, Counts], p: Precision, frozen_bytes: int,
            cfg: DictConfig) -> list[Member]:
    """The networks of `stage` in `mode` with what is trainable and what is frozen (LoRA as in `models/lora.py`:
    the LoRA fake score is an adapter on the teacher's weights; a LoRA student keeps its own frozen float32 base,
    its TMD parts outside `wan` stay trainable)."""
    lora_fake, lora_student = MODES[mode]
    student = c["student"] if stage != "distill_dmd2" else c["teacher"]
    if lora_student:
        out = [Member("student", student.params - student.host + student.lora,
                      student.tensors - student.host_tensors + student.lora_tensors, student.host, p.param)]
    else:
        out = [Member("student", student.params, student.tensors, 0, 0)]
    if stage != "adapt_head":
        teacher = c["teacher"]
        out.append(Member("teacher", 0, 0, teacher.params, frozen_bytes))
        fake = (Member("fake score", teacher.lora, teacher.lora_tensors, 0, 0) if lora_fake
                else Member("fake score", teacher.params, teacher.tensors, 0, 0))
        out.append(fake)
        if cfg.use_gan:
            out.append(Member("discriminator", c["discriminator"].params, c["discriminator"].tensors, 0, 0))
    if cfg.encoders_on_gpu:
        te_bytes = dtype_bytes(cfg.model.text_encoder.get("dtype", "float32"))
        out.append(Member("text encoder", 0, 0, c["text_encoder"].params, te_bytes, shard=False))
        out.append(Member("VAE", 0, 0, c["codec"].params, 4, shard=False))
    return out


def static_rows(stage: str, mode: str, c: dict[str, Counts], setup: Setup, cfg: DictConfig) -> dict[str, float]:
    """Per-GPU bytes that do not depend on the iteration: weights, gradients, AdamW states, strategy buffers."""
    p, world = setup.precision, setup.world
    sharded = setup.strategy == "fsdp" and world > 1
    nets = members(stage, mode, c, p, dtype_bytes(cfg.frozen_dtype), cfg)

    def per_gpu(n: float, shard: bool = True) -> float:
        return n / world if sharded and shard else float(n)

    trainable, tensors = sum(m.trainable for m in nets), sum(m.tensors for m in nets)
    return {
        "trainable weights": per_gpu(trainable * p.param),
        "frozen weights (teacher, LoRA bases)": sum(per_gpu(m.frozen * m.frozen_bytes) for m in nets if m.shard),
        "text encoder + VAE": float(sum(m.frozen * m.frozen_bytes for m in nets if not m.shard)),
        "gradients": per_gpu(trainable * p.param),
        "AdamW states": per_gpu(2 * trainable * p.param + 4 * tensors),
        "DDP buckets / FSDP gathers": strategy_buffers(c, setup, cfg, trainable, stage),
    }


def iteration_totals(stage: str, mode: str, c: dict[str, Counts], s: Sizes, setup: Setup, cfg: DictConfig,
                     checkpointing: bool) -> dict[str, float]:
    """Per-GPU peak of each iteration kind of `stage`: the static rows + its weight copies + its activations."""
    static = sum(static_rows(stage, mode, c, setup, cfg).values())
    disc = (len(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim))
    return {name: static + weight_copies(c, it, setup, cfg, stage) + iteration_bytes(s, it, checkpointing, disc)
            for name, it in iterations(stage, mode, c, s, setup.precision, cfg).items()}


def stage_memory(stage: str, mode: str, c: dict[str, Counts], s: Sizes, setup: Setup,
                 cfg: DictConfig) -> dict[str, float]:
    """Per-GPU bytes of `stage` in `mode`, row by row (see the module docstring for the conventions); the totals
    are the peak over the stage's iteration kinds."""
    rows = static_rows(stage, mode, c, setup, cfg)
    its = iterations(stage, mode, c, s, setup.precision, cfg).values()
    disc = (len(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim))
    rows["autocast bf16 weight copies"] = max(weight_copies(c, it, setup, cfg, stage) for it in its)
    for ckpt, label in ((False, "no checkpointing"), (True, "checkpointing")):
        rows[f"activations, {label}"] = float(max(iteration_bytes(s, it, ckpt, disc) for it in its))
    for ckpt, label in ((False, "no checkpointing"), (True, "checkpointing")):
        rows[f"total, {label}"] = max(iteration_totals(stage, mode, c, s, setup, cfg, ckpt).values())
    return rows


def mixed_policy(setup: Setup, cfg: DictConfig) -> bool:
    """Whether FSDP2 gathers trainable weights in bf16 (`MixedPrecisionPolicy(param_dtype=bf16)`): trainer=fsdp on
    more than one GPU under bf16-mixed with `fsdp_param_dtype` set (FSDP2Strategy's `param_dtype`, the default)."""
    return (setup.strategy == "fsdp" and setup.world > 1 and setup.precision.autocast
            and bool(cfg.get("fsdp_param_dtype")))


def full_precision_head(stage: str, cfg: DictConfig) -> bool:
    """Stage 1 with `fd_full_precision`: under the bf16 policy its head blocks and root unit still gather float32
    (the finite-difference passes run with autocast off; `AdaptHeadStage.full_precision_modules`)."""
    return stage == "adapt_head" and bool(cfg.get("fd_full_precision", True))


def strategy_buffers(c: dict[str, Counts], setup: Setup, cfg: DictConfig, trainable: int,
                     stage: str = "distill") -> float:
    """DDP: a second gradient copy in its buckets (unless gradient_as_bucket_view). FSDP: the unsharded blocks in
    flight of the largest Wan block: 2 gathered parameter blocks (current + prefetched) and its unsharded gradient
    (float32: 4 + 4 x 2 = 12 bytes per block parameter). With the bf16 policy: 2 bf16 gathered blocks, the bf16
    unsharded gradient and its float32 copy for the float32 reduce-scatter (2 x 2 + 2 + 4 = 10 bytes), or 12 when
    Stage 1 gathers its head blocks in float32."""
    if setup.world <= 1 or setup.strategy == "single":
        return 0.0
    if setup.strategy == "ddp":
        return 0.0 if setup.bucket_view else float(trainable * setup.precision.param)
    block = c["teacher"].block
    if mixed_policy(setup, cfg):
        gather = dtype_bytes(cfg.fsdp_param_dtype)
        per_param = 2 * gather + gather + 4
        if full_precision_head(stage, cfg):
            per_param = max(per_param, 3 * setup.precision.param)
        return float(block * per_param)
    return float(2 * block * setup.precision.param + block * setup.precision.param)


def weight_copies(c: dict[str, Counts], it: Iteration, setup: Setup, cfg: DictConfig, stage: str) -> float:
    """bf16-mixed: autocast caches a bf16 copy of every trainable float32 weight it casts until the step's autocast
    region ends (Lightning's training step), for the networks one iteration runs with gradients. Under FSDP with
    float32 gathers (`fsdp_param_dtype=null`) they are copies of the gathered (unsharded) blocks; with the bf16
    policy the gathered weights are bf16 already and autocast copies nothing, except Stage 1's float32 head blocks
    and root unit (`full_precision_head`): H blocks' and the non-block Linear weights."""
    if not (setup.precision.autocast and cfg.autocast_weight_cache):
        return 0.0
    linear = {"student": (c["student"] if stage != "distill_dmd2" else c["teacher"]).linear,
              "fake score": c["teacher"].linear, "discriminator": c["discriminator"].linear}
    if mixed_policy(setup, cfg):
        if not (full_precision_head(stage, cfg) and "student" in it.grad_networks):
            return 0.0
        s = c["student"]
        root = s.linear - s.blocks * s.block_linear
        return float(2 * (int(cfg.tmd.H) * s.block_linear + root))
    return float(2 * sum(linear[n] for n in it.grad_networks))

"""Entry point: `python -m tmd_lightning.plan` — what every stage costs per GPU, before any weight is downloaded.

Builds each network of a run on the meta device (no memory, no weights): the Wan teacher from `model.architecture`,
the TMD student (`TMDTransformer`), the fake score and the DMD2-v student (teacher architecture), the discriminator,
the text encoder (UMT5-XXL from a transformers `UMT5Config`) and the Wan VAE (`AutoencoderKLWan`). It counts their
parameters and prints, per GPU, for Stage 1 (`adapt_head`), Stage 2 (`distill`) and the DMD2-v baseline
(`distill_dmd2`), in full and LoRA mode: weights, gradients, AdamW states, DDP/FSDP buffers, autocast's bf16 weight
copies and activations with and without activation checkpointing, and whether the stage fits `gpu_memory_gib`.
The same tables go to `plan.md` in the run folder. docs/plan.md gives every formula and what it is checked against.

Byte conventions. Lightning's `bf16-mixed` keeps trainable parameters in float32 (they are the master weights, no
second copy), gradients in float32 and AdamW's two moments in float32 (16 bytes per trainable parameter, plus a
4-byte `step` per parameter tensor), and runs the forward under bf16 autocast. The frozen teacher is held in
`frozen_dtype` (bf16). FSDP divides parameters, gradients, optimizer states and the teacher by the world size; DDP
replicates everything. Under FSDP2 with `fsdp_param_dtype=bfloat16` (the `MixedPrecisionPolicy` that trainer=fsdp
applies) the float32 master shards are gathered in bf16, so autocast copies nothing (Stage 1's float32 head blocks
excepted). `experiment=wan_*` plans the run an experiment composes; every plan ends with a verdict per GPU size.
"""

from __future__ import annotations

import datetime
import math
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.models import Discriminator, TMDTransformer, WanVAECodec
from tmd_lightning.models.codecs import Codec
from tmd_lightning.sampling import effective_nfe

register_resolvers()

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
STRATEGIES = ("single", "ddp", "fsdp")
MODES = {"full": (False, False), "LoRA fake": (True, False), "LoRA both": (True, True)}  # (fake score, student)
COLUMNS = [("adapt_head", "full"), *[(s, m) for s in ("distill", "distill_dmd2") for m in MODES]]


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a torch dtype or its name ("bfloat16", "torch.float32")."""
    return DTYPE_BYTES[str(dtype).removeprefix("torch.")]


# -- 1. the networks, on the meta device -------------------------------------------------------------------------
def wan_architecture(model_cfg: DictConfig) -> dict[str, Any]:
    """The teacher's `WanTransformer3DModel` config: `model.architecture` (the Wan2.1 releases), else
    `model.transformer_config` (the toy), else the `transformer/config.json` of `model.pretrained`."""
    for key in ("architecture", "transformer_config"):
        if model_cfg.get(key) is not None:
            return OmegaConf.to_container(model_cfg[key], resolve=True)
    folder = Path(model_cfg.pretrained) / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {model_cfg.name}: no model.architecture and no {folder}/config.json")
    return {k: v for k, v in WanTransformer3DModel.load_config(str(folder)).items() if not k.startswith("_")}


def build_text_encoder(model_cfg: DictConfig) -> nn.Module:
    """The text encoder network (`model.text_encoder.model_class`) from `model.text_encoder_architecture`, else
    from the config in `<model.pretrained>/text_encoder`; no tokenizer, no weights."""
    import transformers

    spec = model_cfg.text_encoder
    cls = getattr(transformers, spec.get("model_class", "UMT5EncoderModel"))
    arch = model_cfg.get("text_encoder_architecture")
    if arch is not None:
        return cls(cls.config_class(**OmegaConf.to_container(arch, resolve=True)))
    return cls(cls.config_class.from_pretrained(str(Path(spec.path) / "text_encoder")))


def build_codec(model_cfg: DictConfig) -> Codec:
    """The codec: the Wan VAE (`WanVAECodec` around `AutoencoderKLWan(**model.vae_architecture)`, or the VAE config
    of `model.pretrained`), else `model.codec` itself (the toy's weightless `PixelCodec`)."""
    if model_cfg.get("vae_architecture") is not None:
        return WanVAECodec(AutoencoderKLWan(**OmegaConf.to_container(model_cfg.vae_architecture, resolve=True)))
    if str(model_cfg.codec.get("_target_", "")).endswith("WanVAECodec.from_pretrained"):
        config = AutoencoderKLWan.load_config(str(Path(model_cfg.codec.path) / "vae"))
        return WanVAECodec(AutoencoderKLWan.from_config(config))
    return instantiate(model_cfg.codec)


def build_networks(cfg: DictConfig) -> dict[str, nn.Module]:
    """Every network the three stages hold, on the meta device. The fake score and the DMD2-v student are teacher
    copies, so the teacher's module stands for them."""
    arch = wan_architecture(cfg.model)
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    with torch.device("meta"):
        return {
            "teacher": WanTransformer3DModel(**arch),
            "student": TMDTransformer(wan_config=arch, head_blocks=int(cfg.tmd.H), fusion=str(cfg.tmd.fusion)),
            "discriminator": Discriminator(dim, tuple(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim)),
            "text_encoder": build_text_encoder(cfg.model),
            "codec": build_codec(cfg.model),
        }


# -- 2. parameter counts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    """One network's parameter counts (numbers of parameters, not bytes)."""

    params: int
    tensors: int  # parameter tensors: AdamW keeps a 4-byte `step` per tensor
    linear: int  # weights + biases of Linear / Conv layers: what autocast copies to bf16
    lora: int  # LoRA adapter parameters: rank x (in + out) per adapted Linear
    lora_tensors: int  # 2 per adapted Linear (A and B)
    host: int  # parameters of the module the adapters go on (network.wan for the TMD student): frozen under LoRA
    host_tensors: int
    host_linear: int
    block: int  # parameters of the largest Wan block (FSDP's unit); 0 outside Wan
    block_linear: int = 0  # Linear parameters of the largest Wan block (autocast copies of one block)
    blocks: int = 0  # Wan blocks of the network (L)


def numel(params: Iterable[nn.Parameter]) -> int:
    """Number of elements of the given parameters (meta tensors have shapes, so this works without memory)."""
    return sum(p.numel() for p in params)


def lora_linears(host: nn.Module, targets: Iterable[str]) -> list[nn.Linear]:
    """The Linear layers peft's LoRA adapts: qualified name equal to a target or ending in "." + a target."""
    targets = list(targets)
    return [m for name, m in host.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)]


def linear_params(module: nn.Module) -> int:
    """Parameters of the Linear and Conv layers in `module` (the ones autocast runs in bf16)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(numel(m.parameters(recurse=False)) for m in module.modules() if isinstance(m, kinds))


def count(network: nn.Module, rank: int, targets: Iterable[str]) -> Counts:
    """Counts of `network`; the LoRA host is `network.wan` for the TMD student, else the network (as
    `models.lora.lora_host`), and only Wan transformers get adapters."""
    host = getattr(network, "wan", network)
    adapted = lora_linears(host, targets) if isinstance(host, WanTransformer3DModel) else []
    blocks = getattr(host, "blocks", None) if isinstance(host, WanTransformer3DModel) else None
    return Counts(params=numel(network.parameters()), tensors=len(list(network.parameters())),
                  linear=linear_params(network), lora=sum(rank * (m.in_features + m.out_features) for m in adapted),
                  lora_tensors=2 * len(adapted), host=numel(host.parameters()),
                  host_tensors=len(list(host.parameters())), host_linear=linear_params(host),
                  block=max((numel(b.parameters()) for b in blocks), default=0) if blocks is not None else 0,
                  block_linear=max((linear_params(b) for b in blocks), default=0) if blocks is not None else 0,
                  blocks=len(blocks) if blocks is not None else 0)


def count_all(networks: dict[str, nn.Module], lora_cfg: DictConfig) -> dict[str, Counts]:
    """`count` of every network, with the LoRA rank and target modules of the `lora` config."""
    rank, targets = int(lora_cfg.rank), list(lora_cfg.target_modules)
    return {name: count(net, rank, targets) for name, net in networks.items()}


# -- 3. shapes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """The widths and lengths activations scale with."""

    latent: tuple[int, ...]  # (C, T, h, w) of one video's latents
    grid: tuple[int, int, int]  # tokens per axis after Wan's patching
    text_len: int  # text tokens per caption (the text encoder's max_length)
    dim: int  # D
    ffn: int  # F
    heads: int
    head_dim: int
    patch_in: int  # latent values per token: in_channels x patch volume
    text_dim: int
    num_layers: int  # L

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


def sizes(cfg: DictConfig, codec: Codec, arch: dict[str, Any]) -> Sizes:
    """Latent and token grid of `cfg.video` through the codec and Wan's patch size (81 x 480 x 832 with the Wan VAE:
    latents 16 x 21 x 60 x 104, patches (1, 2, 2): 21 x 30 x 52 = 32,760 tokens)."""
    latent = codec.latent_shape(int(cfg.video.num_frames), int(cfg.video.height), int(cfg.video.width))
    patch = tuple(arch["patch_size"])
    grid = tuple(n // p for n, p in zip(latent[1:], patch, strict=True))
    heads, head_dim = arch["num_attention_heads"], arch["attention_head_dim"]
    return Sizes(tuple(latent), grid, int(cfg.model.text_encoder.max_length), heads * head_dim, arch["ffn_dim"],
                 heads, head_dim, arch["in_channels"] * math.prod(patch), arch["text_dim"], arch["num_layers"])


# -- 4. activations -----------------------------------------------------------------------------------------------
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
# (autocast over float32 weights, or a bf16 network). Checked exactly against real blocks in tests/test_plan.py.
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
    """Estimates for the parts around the blocks (validated together with the blocks, tests/test_plan.py): patch
    and text embeddings, Wan's output head (fp32 norm input and output + projection input), the gated inner fusion
    (fp32 norm input and output + three compute-dtype tensors of width D) and the LoRA down-projections."""
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
    D-wide), per token; compared with measured peaks in tests/test_plan.py."""
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


# -- 5. the stages ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bytes per trainable parameter (= per gradient = per AdamW moment) and whether activations are bf16."""

    param: int
    mixed: bool
    autocast: bool


def parse_precision(name: Any) -> Precision:
    """Lightning's precision flag: *-mixed keeps float32 parameters under autocast, bf16-true holds bf16."""
    name = str(name)
    if name.endswith("-mixed"):
        return Precision(4, True, True)
    if name in ("bf16-true", "16-true", "bf16", "16"):
        return Precision(2, True, False)
    if name in ("32-true", "32", "64-true"):
        return Precision(4 if name != "64-true" else 8, False, False)
    raise ValueError(f"unknown precision {name!r}; use bf16-mixed, 16-mixed, 32-true or bf16-true")


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


def iterations(stage: str, mode: str, c: dict[str, Counts], s: Sizes, p: Precision,
               cfg: DictConfig) -> dict[str, Iteration]:
    """The iteration kinds of `stage` (docs/method.md §4-5) as calls with gradients: Stage 1's backbone + one head
    call; Stage 2's student iteration (student with the inner rollout, teacher on the GAN path up to its last
    feature block, discriminator) and critic iteration (fake score, discriminator on fake and real)."""
    lora_fake, lora_student = MODES[mode]
    b, L, H, N = int(cfg.micro_batch), s.num_layers, int(cfg.tmd.H), int(cfg.tmd.N)
    rank, teacher_mixed = int(cfg.lora.rank), dtype_bytes(cfg.frozen_dtype) == 2
    per_block = c["teacher"].lora_tensors // 2 // L
    host = c["student"] if stage != "distill_dmd2" else c["teacher"]
    base_linear = host.host_linear if lora_student and p.autocast else 0  # casts autograd keeps, per L blocks

    def student(blocks: int, **kw: Any) -> Call:
        return Call(blocks, b, True, p.mixed, lora=per_block if lora_student else 0, rank=rank,
                    frozen_fp32_linear=base_linear * blocks // L, **kw)

    grad_student = () if lora_student else ("student",)
    if stage == "adapt_head":
        calls = (student(L - H, embed=True), student(H, heads=1))
        return {"step": Iteration(calls, 2 * b, p.mixed, grad_networks=grad_student)}
    if stage == "distill":
        student_calls = (student(L - H, embed=True), *[student(H, heads=1)] * N)
    else:
        student_calls = (student(L, embed=True, output_head=True),)
    gan = bool(cfg.use_gan)
    teacher = Call(max(cfg.model.disc_blocks) + 1, b, False, teacher_mixed)
    fake = Call(L, b, True, teacher_mixed if lora_fake else p.mixed, embed=not lora_fake, output_head=True,
                lora=per_block if lora_fake else 0, rank=rank)
    disc = ("discriminator",) if gan else ()
    return {"student": Iteration(student_calls + ((teacher,) if gan else ()), 2 * b, teacher_mixed,
                                 b if gan else 0, grad_student + disc),
            "critic": Iteration((fake,), 2 * b, teacher_mixed, 2 * b if gan else 0,
                                (() if lora_fake else ("fake score",)) + disc)}


@dataclass(frozen=True)
class Setup:
    """How the run is spread: strategy, world size, precision and the strategy's options."""

    strategy: str
    world: int
    precision: Precision
    bucket_view: bool = False  # DDP's gradient_as_bucket_view (no second gradient copy)


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


# -- 6. measuring what the plan estimates -----------------------------------------------------------------------
class TensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that operators create inside the region: `live` (still referenced now) and
    `peak` — a device-independent stand-in for `torch.cuda.max_memory_allocated`, used to check the plan on CPU
    (tests) and by `benchmarks/scale.py` without a GPU. Storages that existed before (parameters, inputs) and views
    of an operator's inputs are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.discard(key)

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in inputs or key in self._alive:
            return
        self._alive.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)

    def __torch_dispatch__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage(), inputs)
        return out


# -- 7. the run: strategy, tables -----------------------------------------------------------------------------------
def strategy_name(cfg: DictConfig) -> str:
    """single | ddp | fsdp: `cfg.strategy` if set, else read from `trainer.strategy` (a name or a Lightning strategy
    `_target_`: ModelParallelStrategy and FSDPStrategy are fsdp), else ddp on more than one GPU."""
    if cfg.get("strategy"):
        name = str(cfg.strategy).lower()
        if name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
        return name
    spec = cfg.trainer.get("strategy", "auto")
    text = str(spec.get("_target_", "") if isinstance(spec, DictConfig) else spec).lower()
    if "fsdp" in text or "modelparallel" in text:
        return "fsdp"
    if "ddp" in text:
        return "ddp"
    return "single" if "single" in text or world_size(cfg) == 1 else "ddp"


def world_size(cfg: DictConfig) -> int:
    """GPUs in the run: `trainer.devices` (an integer or a list of ids) x `trainer.num_nodes`."""
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) and not OmegaConf.is_list(devices):
        raise ValueError(f"plan needs a device count, not trainer.devices={devices!r}: pass trainer.devices=N")
    devices = len(devices) if OmegaConf.is_list(devices) else max(int(devices), 1)
    return devices * int(cfg.trainer.get("num_nodes", 1))


def make_setup(cfg: DictConfig) -> Setup:
    """Strategy, world size, precision and DDP's bucket view of the run `cfg` describes."""
    strategy = strategy_name(cfg)
    spec = cfg.trainer.get("strategy")
    bucket_view = bool(spec.get("gradient_as_bucket_view", False)) if isinstance(spec, DictConfig) else False
    world = 1 if strategy == "single" else world_size(cfg)
    return Setup(strategy, world, parse_precision(cfg.trainer.get("precision", "bf16-mixed")), bucket_view)


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, for the tables."""
    return f"{n / GIB:.1f}"


def params_table(c: dict[str, Counts], cfg: DictConfig, setup: Setup) -> str:
    """Markdown: every network with its role, parameter count, LoRA adapter size and how it is held."""
    te_dtype = str(cfg.model.text_encoder.get("dtype", "float32"))
    train = f"{'float32' if setup.precision.param == 4 else 'bfloat16'} + grads + AdamW"
    rows = [("teacher", "frozen", c["teacher"], str(cfg.frozen_dtype)),
            ("TMD student", "trainable", c["student"], train),
            ("fake score", "trainable (teacher copy)", c["teacher"], train),
            ("DMD2-v student", "trainable (teacher copy)", c["teacher"], train),
            ("discriminator", "trainable", c["discriminator"], train),
            ("text encoder", "frozen", c["text_encoder"], te_dtype),
            ("VAE", "frozen", c["codec"], "float32")]
    lines = [f"| network | role | parameters | LoRA adapter (r={cfg.lora.rank}) | held as |", "|---|---|---:|---:|---|"]
    for name, role, n, held in rows:
        lora = f"{n.lora:,}" if n.lora else ""
        lines.append(f"| {name} | {role} | {n.params:,} | {lora} | {held} |")
    return "\n".join(lines)


def memory_table(mem: dict[tuple[str, str], dict[str, float]], limit: float) -> str:
    """Markdown: one column per (stage, mode), one row per memory item, and whether the totals fit `limit`."""
    cols = list(mem)
    head = "| per GPU, GiB | " + " | ".join(f"{s} {m}" for s, m in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for row in next(iter(mem.values())):
        lines.append(f"| {row} | " + " | ".join(gib(mem[col][row]) for col in cols) + " |")
    fits = [("yes" if mem[col]["total, no checkpointing"] <= limit else "no") + " / "
            + ("yes" if mem[col]["total, checkpointing"] <= limit else "no") for col in cols]
    lines.append(f"| fits {limit / GIB:g} GiB (no ckpt / ckpt) | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def summary_lines(cfg: DictConfig, s: Sizes, setup: Setup) -> list[str]:
    """The plan's setting: model, token count, strategy, the samplers' effective NFE and the paper's recipe."""
    L, H, M, N = s.num_layers, int(cfg.tmd.H), int(cfg.tmd.M), int(cfg.tmd.N)
    tmd, teacher = effective_nfe(M, N, H, L), effective_nfe(50, cfg=True)
    lines = [f"model {cfg.model.name}: L = {L}, D = {s.dim}, F = {s.ffn}, H = {H}",
             f"video {cfg.video.num_frames} x {cfg.video.height} x {cfg.video.width} -> latents "
             f"{' x '.join(map(str, s.latent))} -> tokens {' x '.join(map(str, s.grid))} = {s.tokens:,}; "
             f"text {s.text_len} tokens; micro-batch {cfg.micro_batch} video(s) per GPU",
             f"strategy {setup.strategy} on {setup.world} GPU(s), precision {cfg.trainer.get('precision')}, "
             f"frozen teacher {cfg.frozen_dtype}",
             f"sampling: TMD M={M} N={N} (H={H} of L={L}) effective NFE {tmd:.2f}; teacher 50 steps x 2 (CFG) "
             f"NFE {teacher:g}; {teacher / tmd:.0f}x fewer block evaluations"]
    recipe = cfg.model.get("recipe")
    if recipe is not None:
        lines.append(f"paper recipe: adapt_head AdamW lr {recipe.adapt_head.lr:g}, loss_c {recipe.adapt_head.loss_c:g}"
                     f", batch {recipe.adapt_head.global_batch}, {recipe.adapt_head.iterations} iterations; distill lr "
                     f"{recipe.distill.lr:g}, {recipe.distill.iterations} iterations (M >= 2), "
                     f"{recipe.distill.iterations_m1} (M = 1)")
    return lines


def columns(cfg: DictConfig) -> list[tuple[str, str]]:
    """The (stage, mode) columns to plan: all of them, or the stage of `experiment=...` (`plan_stage`)."""
    stage = cfg.get("plan_stage")
    return [col for col in COLUMNS if stage is None or col[0] == stage]


def verdicts(mem: dict[tuple[str, str], dict[str, float]], setup: Setup, cfg: DictConfig,
             checkpointing: bool = True) -> list[dict[str, Any]]:
    """Per column and GPU size of `verdict_gpus`: the per-GPU total (with or without activation checkpointing) and
    whether it fits; LoRA columns under FSDP2 are marked unsupported (the setup guard refuses them)."""
    key = "total, checkpointing" if checkpointing else "total, no checkpointing"
    rows = []
    for (stage, mode), items in mem.items():
        need = items[key]
        row = {"stage": stage, "mode": mode, "need": need, "fits": {}, "supported": True}
        if mode != "full" and setup.strategy == "fsdp" and setup.world > 1:
            row["supported"] = False
        for gpu in cfg.verdict_gpus:
            row["fits"][str(gpu.name)] = need <= float(gpu.gib) * GIB
        rows.append(row)
    return rows


def verdict_table(rows: list[dict[str, Any]], cfg: DictConfig, setup: Setup, checkpointing: bool) -> str:
    """Markdown: one row per column, one verdict per GPU size (fits, with the spare or missing GiB)."""
    gpus = list(cfg.verdict_gpus)
    head = "| stage, mode | per GPU | " + " | ".join(f"{g.name} ({g.gib:g} GiB)" for g in gpus) + " |"
    lines = [head, "|---|---:|" + "---|" * len(gpus)]
    for r in rows:
        cells = []
        for g in gpus:
            spare = float(g.gib) - r["need"] / GIB
            cell = f"fits ({spare:.1f} GiB spare)" if spare >= 0 else f"does not fit ({-spare:.1f} GiB over)"
            cells.append(cell if r["supported"] else f"{cell}; LoRA is refused under FSDP2 (trainer=ddp)")
        lines.append(f"| {r['stage']} {r['mode']} | {gib(r['need'])} GiB | " + " | ".join(cells) + " |")
    where = f"{setup.strategy} on {setup.world} GPU(s)"
    lines.append("")
    lines.append(f"Verdict ({where}, micro-batch {cfg.micro_batch}, activation checkpointing "
                 f"{'on' if checkpointing else 'off'}, encoders {'on' if cfg.encoders_on_gpu else 'off'} the GPU):")
    for g in gpus:
        ok = [f"{r['stage']} {r['mode']}" for r in rows if r["supported"] and r["fits"][str(g.name)]]
        too_big = [f"{r['stage']} {r['mode']}" for r in rows if r["supported"] and not r["fits"][str(g.name)]]
        text = f"fits {', '.join(ok)}" if ok else "nothing fits"
        lines.append(f"- {g.name}: {text}" + (f"; does not fit {', '.join(too_big)}" if ok and too_big else ""))
    return "\n".join(lines)


def plan(cfg: DictConfig) -> dict[str, Any]:
    """Counts and per-GPU memory of every (stage, mode) column, without printing."""
    networks = build_networks(cfg)
    counts = count_all(networks, cfg.lora)
    s = sizes(cfg, networks["codec"], wan_architecture(cfg.model))
    setup = make_setup(cfg)
    mem = {col: stage_memory(*col, counts, s, setup, cfg) for col in columns(cfg)}
    ckpt = bool(cfg.get("activation_checkpointing", True))
    return {"counts": counts, "sizes": s, "setup": setup, "memory": mem, "verdicts": verdicts(mem, setup, cfg, ckpt)}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Prints the plan and writes it to `<output_dir>/plan.md`; returns what `plan` returns plus the Markdown."""
    result = plan(cfg)
    limit = float(cfg.gpu_memory_gib) * GIB
    title = f"{cfg.model.name}" + (f", experiment={cfg.experiment}" if cfg.get("experiment") else "")
    text = "\n".join([f"# Memory plan: {title}", "",
                      *[f"- {line}" for line in summary_lines(cfg, result["sizes"], result["setup"])], "",
                      "## Parameters", "", params_table(result["counts"], cfg, result["setup"]), "",
                      "## Per-GPU memory", "", memory_table(result["memory"], limit), "",
                      "## Verdict per GPU size", "",
                      verdict_table(result["verdicts"], cfg, result["setup"],
                                    bool(cfg.get("activation_checkpointing", True))), "",
                      "Columns: stage and mode (full; LoRA fake = stage.lora.fake_score; LoRA both = + stage.lora."
                      "student). Totals: the static rows plus the weight copies and activations of the stage's "
                      "largest iteration kind, at the end of its forward (last step's gradients still allocated). "
                      "Formulas and what they are checked against: docs/plan.md."])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.md").write_text(text + "\n")
    print(text + f"\n\nwritten to {out / 'plan.md'}")
    return result | {"markdown": text}


# keys of configs/plan.yaml that the fit config does not have: given with experiment=..., they go to the plan
PLAN_ONLY = ("strategy", "gpu_memory_gib", "micro_batch", "video", "frozen_dtype", "discriminator_hidden_dim",
             "use_gan", "encoders_on_gpu", "autocast_weight_cache", "fsdp_param_dtype", "fd_full_precision",
             "verdict_gpus", "output_dir", "lora", "hydra", "paths")


def experiment_config(overrides: list[str]) -> DictConfig:
    """The plan config of `python -m tmd_lightning.plan experiment=wan_* [overrides]`: the fit config the experiment
    composes (with the overrides the fit config knows: model, trainer, stage, data, ...) turned into plan keys the way
    the setup guard does (`guards.plan_config`: its stage, micro batch, clip size, cache, LoRA flags, the strategy's
    param_dtype), its activation checkpointing and stage as the verdict's, then the plan-only overrides."""
    from hydra import compose, initialize_config_dir

    from tmd_lightning.guards import PLAN_STAGES, plan_config

    own = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in PLAN_ONLY]
    fit = [o for o in overrides if o not in own]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        fit_cfg = compose("fit", overrides=fit)
        base = compose("plan", overrides=[o for o in overrides if o.split("=")[0] in ("model", "trainer")] + own)
    stage = PLAN_STAGES.get(str(fit_cfg.stage.get("_target_", "")))
    if stage is None:
        raise ValueError(f"experiment {fit_cfg.get('task_name')}: stage {fit_cfg.stage.get('_target_')} is not one the "
                         f"plan models ({', '.join(PLAN_STAGES.values())})")
    derived = plan_config(fit_cfg)
    asked = {o.lstrip("+").split("=")[0] for o in own}
    for key, value in derived.items():
        if key not in asked and not any(a.startswith(f"{key}.") for a in asked):
            OmegaConf.update(base, key, value, merge=False, force_add=True)
    given = [o.split("=", 1)[1] for o in own if o.split("=")[0] in ("output_dir", "paths.output_dir")]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = Path(os.environ.get("TMD_ROOT", Path.cwd()))
    OmegaConf.set_struct(base, False)
    base.output_dir = given[-1] if given else str(root / "logs" / "plan" / "runs" / stamp)
    base.experiment = str(fit_cfg.get("task_name"))
    base.plan_stage = stage
    base.activation_checkpointing = bool(fit_cfg.stage.get("activation_checkpointing", False))
    return base


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="plan")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """`python -m tmd_lightning.plan [overrides]`; with `experiment=wan_*`, the plan of that experiment's run."""
    import sys

    overrides = sys.argv[1:]
    if any(o.lstrip("+").startswith("experiment=") for o in overrides):
        run(experiment_config([o.lstrip("+") if o.lstrip("+").startswith("experiment=") else o for o in overrides]))
        return
    _hydra_main()


if __name__ == "__main__":
    main()

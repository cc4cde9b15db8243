"""How a stage runs data-parallel (docs/method.md §9): DDP checks, FSDP2 sharding per Wan block, activation
checkpointing, per-rank random streams, and a sharded network gathered whole for export.

Everything here is called from `VideoStage.configure_model` / `setup` / `export_pretrained`, so every stage gets
it; the strategies themselves are plain Lightning (`DDPStrategy`) or `tmd_lightning.runtime.strategies.FSDP2Strategy`.

FSDP2 layout (`fully_shard`), decided per network of the stage (its registered children):
- every Wan block (`WanTransformerBlock`) is one FSDP unit: its weights are gathered for its forward and freed after;
- a network with trainable weights outside its blocks (patch/condition embedders, output head, the student's Δ
  embedder and fusion; the discriminator) also gets a root unit over those weights. The TMD student is called
  through `backbone` and `head` rather than `forward`, so those are registered as FSDP forward methods;
- a frozen network (the teacher) keeps its small non-block weights unsharded on every rank: they need no gradient
  reduction, and `block_features` calls them outside `forward`;
- frozen encoders without Wan blocks (codec, text encoder) are left alone (replicated);
- 0-d parameters (the fusion gate α), which FSDP2 cannot shard, become 1-element vectors (state dicts keep them 0-d);
- under bf16-mixed, trainable networks gather their float32 shards in bf16 (`MixedPrecisionPolicy`, see
  `shard_stage`): every parameter of a unit, so also the float32 modules diffusers keeps (norm weights, modulation
  tables, time embedder) arrive rounded to bf16; their computations still run in float32 (Wan upcasts there), as
  Linear layers already ran in bf16 under autocast. Units a stage lists in `full_precision_modules` gather float32;
- networks built on the meta device (ranks > 0, `models/rank0.py`) get memory for their shards only and receive
  global rank 0's weights after sharding (`state_for_broadcast` / `load_from_rank0`).
Calls of a sharded network are collectives, so calls that depend on the data (Stage 1's CFG and finite-difference
passes on some rows) go through `rows_to_run`, which keeps every rank making the same calls.
"""

from __future__ import annotations

import logging
import os
import random
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from tmd_lightning.models.tmd import TMDTransformer

log = logging.getLogger(__name__)

FORWARD_METHODS = {TMDTransformer: ("backbone", "head")}  # entry points besides `forward` that use root weights


def configure_parallel(stage: L.LightningModule, activation_checkpointing: bool = False) -> None:
    """`configure_model` of every stage: activation checkpointing, then what the trainer's strategy needs.

    Idempotent (Lightning calls `configure_model` once per `fit` / `validate` call, and `load_from_checkpoint` once
    without a trainer: then there is no strategy to prepare). Unsupported strategies and settings that would fail
    later (DDP without unused-parameter detection under manual optimisation) are errors here, before any step runs.
    """
    if activation_checkpointing:
        enable_activation_checkpointing(stage)
    if stage._trainer is None:
        return
    strategy = stage.trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        if stage.device_mesh["tensor_parallel"].size() > 1:  # Lightning's own "auto" sizes mean TP within a node
            raise ValueError(f"{type(strategy).__name__} has a tensor-parallel mesh of size "
                             f"{stage.device_mesh['tensor_parallel'].size()}, but the stages apply no tensor "
                             "parallelism (ranks would read the same batches unsynchronised): use trainer=fsdp "
                             "(tmd_lightning.runtime.strategies.FSDP2Strategy) or tensor_parallel_size=1")
        shard_stage(stage, stage.device_mesh["data_parallel"],
                    sharding_param_dtype(strategy, str(stage.trainer.precision)))
    elif isinstance(strategy, DDPStrategy):
        prepare_ddp(stage, strategy)
    elif not isinstance(strategy, SingleDeviceStrategy):
        raise TypeError(f"{type(strategy).__name__} is not supported by {type(stage).__name__}: use trainer=ddp "
                        "(DDPStrategy) or trainer=fsdp (tmd_lightning.runtime.strategies.FSDP2Strategy); Lightning's "
                        "FSDPStrategy cannot run the distill stage's manual optimisation with three optimizers")


def enable_activation_checkpointing(stage: nn.Module) -> list[str]:
    """diffusers' gradient checkpointing (non-reentrant, one checkpoint per Wan block) on every Wan model of the
    stage (student, teacher, fake score); returns their names. Only active while gradients are enabled."""
    names = []
    for name, module in stage.named_modules():
        if isinstance(module, WanTransformer3DModel):
            if not module.gradient_checkpointing:
                module.enable_gradient_checkpointing()
            names.append(name)
    return names


# -- DDP ---------------------------------------------------------------------------------------------------------------
def prepare_ddp(stage: L.LightningModule, strategy: DDPStrategy) -> None:
    """Checks the DDP settings the stage needs and keeps frozen weights out of DDP's broadcasts.

    Lightning wraps the whole LightningModule in one `DistributedDataParallel`. Under manual optimisation (distill)
    an iteration backpropagates into one network only (student, or fake score + discriminator), so DDP must be told
    that parameters may go unused (`find_unused_parameters=True`); `static_graph` would assume the same used set
    every iteration, which the alternation breaks. Frozen weights (teacher, codec, text encoder) load identically on
    every rank and are excluded from DDP's start-up broadcast (UMT5 + a teacher are tens of GB).
    """
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", {})
    if not stage.automatic_optimization:
        if not ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(f"{type(stage).__name__} steps one network per iteration (manual optimisation): DDP "
                             "needs find_unused_parameters=True (trainer.strategy.find_unused_parameters=true)")
        if ddp_kwargs.get("static_graph", False):
            raise ValueError(f"{type(stage).__name__} alternates the networks it trains, which DDP's "
                             "static_graph=True does not allow (trainer.strategy.static_graph=false)")
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(stage, frozen_state_names(stage))


def frozen_state_names(stage: nn.Module) -> list[str]:
    """Names of frozen parameters, and of the buffers of children that train nothing (codec, text encoder, a
    teacher without adapters): what DDP need not broadcast."""
    names = [n for n, p in stage.named_parameters() if not p.requires_grad]
    for child_name, child in stage.named_children():
        if not any(p.requires_grad for p in child.parameters()):
            names += [f"{child_name}.{n}" for n, _ in child.named_buffers()]
    return names


# -- FSDP2 -------------------------------------------------------------------------------------------------------------
def shard_stage(stage: L.LightningModule, mesh: dist.DeviceMesh, param_dtype: torch.dtype | None = None) -> list[str]:
    """`fully_shard` the stage's networks as the module docstring lays out; returns the names of the sharded units.

    `param_dtype` (bf16 under `bf16-mixed`, `sharding_param_dtype`): the units of trainable networks get FSDP2's
    `MixedPrecisionPolicy(param_dtype, reduce_dtype=float32, cast_forward_inputs=False)`: float32 sharded master
    weights (what AdamW updates), gathered as `param_dtype` for each forward and backward and freed after, gradients
    reduced in float32. Autocast stays on for the activations and finds bf16 weights, so it keeps no bf16 copy of the
    gathered blocks. Units a stage needs in float32 (`VideoStage.full_precision_modules`: Stage 1's finite-difference
    head passes) are sharded without it. Frozen networks (the teacher, bf16 since `DistillStage.setup`) gather in the
    dtype they are held in.

    Networks built on the meta device (ranks > 0 under `models.rank0.rank0_weights`) are sharded, given memory for
    their shards only and filled from global rank 0 (`load_from_rank0`).

    Raises when a trainable parameter ends up in no FSDP unit (its gradients would never be averaged) and when a
    network carries LoRA adapters (not supported with FSDP2 yet: use trainer=ddp).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    full_precision = {id(m) for m in getattr(stage, "full_precision_modules", lambda: [])()}
    units: list[str] = []
    for name, child in stage.named_children():
        if isinstance(child, FSDPModule) or not _owned_parameters(child):
            continue
        _refuse_adapters(name, child)
        trainable = any(p.requires_grad for p in _owned_parameters(child))

        def policy(module: nn.Module, trainable: bool = trainable) -> MixedPrecisionPolicy:
            if param_dtype is None or not trainable or id(module) in full_precision:
                return MixedPrecisionPolicy()
            return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)  # times and the residual stream stay float32

        rank0_state = state_for_broadcast(child, mesh)
        promote_scalar_parameters(child)
        blocks = [(n, m) for n, m in child.named_modules() if isinstance(m, WanTransformerBlock)]
        for block_name, block in blocks:
            if not isinstance(block, FSDPModule):  # also when no root unit sits above
                fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy(block))
            units.append(f"{name}.{block_name}")
        in_blocks = {id(p) for _, block in blocks for p in block.parameters()}
        if any(p.requires_grad and id(p) not in in_blocks for p in _owned_parameters(child)):
            fully_shard(child, mesh=mesh, mp_policy=policy(child))
            for cls, methods in FORWARD_METHODS.items():
                if isinstance(child, cls):
                    for method in methods:
                        register_fsdp_forward_method(child, method)
            units.append(name)
        if rank0_state is not None:
            load_from_rank0(child, rank0_state, mesh)
    stray = [n for n, p in stage.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if stray:
        raise RuntimeError(f"{len(stray)} trainable parameter(s) of {type(stage).__name__} are in no FSDP unit, so "
                           f"their gradients would not be averaged across ranks: {stray[:5]}; keep trainable weights "
                           "inside a registered child network")
    log.info("FSDP2 units of %s: %d (%s ...)", type(stage).__name__, len(units), ", ".join(units[:4]))
    return units


def sharding_param_dtype(strategy: ModelParallelStrategy, precision: str) -> torch.dtype | None:
    """The dtype FSDP2 gathers trainable weights in: the strategy's `param_dtype` ("bfloat16" by default) under
    `bf16-mixed`, None (float32 weights, autocast casts them) under any other precision or `param_dtype: null`."""
    name = getattr(strategy, "param_dtype", "bfloat16")
    if name is None or not str(precision).startswith("bf16-mixed"):
        return None
    return getattr(torch, str(name))


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` is on the meta device (built without weights)."""
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def state_for_broadcast(network: nn.Module, mesh: dist.DeviceMesh) -> dict[str, torch.Tensor] | None:
    """Collective over `mesh`: None when no rank built `network` on the meta device; else rank 0's full state dict
    (its own tensors, no copy; `{}` on the other ranks), to be broadcast after sharding. Global rank 0 must hold the
    weights: an error when it is the one on meta."""
    flag = torch.tensor([float(is_meta(network))], device=_mesh_device(mesh))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group())
    if flag.item() == 0:
        return None
    if dist.get_rank() == 0:
        if is_meta(network):
            raise RuntimeError("global rank 0 built a network on the meta device: it must load the weights that "
                               "the other ranks receive (models.rank0.skip_weights is false on rank 0)")
        return network.state_dict()
    return {}


def load_from_rank0(network: nn.Module, state: dict[str, torch.Tensor], mesh: dist.DeviceMesh) -> None:
    """After `fully_shard`: memory for the local shards only on ranks that built `network` on meta (`to_empty`), then
    every parameter and persistent buffer from rank 0's full `state`, one tensor at a time (torch's
    `set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`), and the non-persistent buffers (rope
    tables) broadcast as they are. A rank > 0 never holds more than one full tensor of the network."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = _mesh_device(mesh)
    if is_meta(network):
        network.to_empty(device=device)
    set_model_state_dict(network, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    src = dist.get_global_rank(mesh.get_group(), 0)
    for buffer in network.buffers():
        if buffer.device != device:
            buffer.data = buffer.data.to(device)
        dist.broadcast(buffer.data, src=src, group=mesh.get_group())


def _mesh_device(mesh: dist.DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def promote_scalar_parameters(network: nn.Module) -> list[str]:
    """FSDP2 cannot shard 0-d parameters (the student's fusion gate α): each becomes a 1-element vector, which
    broadcasts like the scalar in every use, while state dicts keep showing it 0-d (checkpoints, exports and
    `load_state_dict` stay interchangeable with unsharded runs). Returns the promoted names."""
    promoted = []
    for module_name, module in network.named_modules():
        names = [n for n, p in module._parameters.items() if p is not None and p.dim() == 0]
        if not names:
            continue
        for n in names:
            old = module._parameters[n]
            module._parameters[n] = nn.Parameter(old.detach().reshape(1), requires_grad=old.requires_grad)
        module.register_state_dict_post_hook(partial(_scalars_to_state, names=tuple(names)))
        module.register_load_state_dict_pre_hook(partial(_scalars_from_state, names=tuple(names)))
        promoted += [f"{module_name}.{n}" if module_name else n for n in names]
    return promoted


def _scalars_to_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                      names: tuple[str, ...]) -> None:
    for n in names:
        value = state_dict.get(prefix + n)
        if value is not None:  # a sharded 1-element vector is gathered (a collective, like every sharded state dict)
            state_dict[prefix + n] = (value.full_tensor() if isinstance(value, DTensor) else value).reshape(())


def _scalars_from_state(module: nn.Module, state_dict: dict, prefix: str, *args: object,
                        names: tuple[str, ...]) -> None:
    from torch.distributed.tensor import distribute_tensor

    for n in names:
        value, param = state_dict.get(prefix + n), module._parameters[n]
        if value is None or value.dim() != 0:
            continue
        value = value.reshape(1).to(param.device, param.dtype)
        state_dict[prefix + n] = distribute_tensor(value, param.device_mesh, param.placements) \
            if isinstance(param, DTensor) else value


def rows_to_run(network: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(rows, whether to call `network` on them) for a call made only when some rows need it.

    Under FSDP2 every call of a sharded network gathers its weights with the other ranks, so all ranks must make
    the same calls: when any rank has rows, every rank calls, and a rank without rows of its own runs its first row
    and must discard the result (`rows.any()` is False there). Elsewhere: `(rows, rows.any())`, no communication.
    """
    from torch.distributed.fsdp import FSDPModule

    local = bool(rows.any())
    if not isinstance(network, FSDPModule):
        return rows, local
    flag = torch.tensor([float(local)], device=rows.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0 or local:
        return rows, local
    return torch.arange(rows.shape[0], device=rows.device) == 0, True


def _owned_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters registered in `module`'s own tree (not those a view module like `AdapterView` lends)."""
    seen: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _refuse_adapters(name: str, network: nn.Module) -> None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    if any(isinstance(m, BaseTunerLayer) for m in network.modules()):
        raise NotImplementedError(f"{name} carries LoRA adapters (stage.lora), which FSDP2 sharding does not support "
                                  "yet (a bf16 base and float32 adapters in one unit, merged export): use trainer=ddp")


def network_class(module: nn.Module) -> type:
    """The network's own class: `fully_shard` swaps a module's class for a generated `FSDP<Name>` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is an FSDP2 shard (a DTensor)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def gathered_network(network: nn.Module) -> nn.Module | None:
    """`network` itself when it is not sharded; under FSDP2 an unsharded CPU copy on global rank 0 and None on the
    other ranks. Collective when sharded: every rank must call it (the full state dict is gathered shard by shard).

    The copy is built on the meta device and takes the gathered tensors as its weights (no second initialisation).
    Non-persistent buffers (rope tables) stay on meta: the copy is for `save_pretrained`, not for running.
    """
    if not is_sharded(network):
        return network
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        copy = network_class(network).from_config(network.config)
    copy.load_state_dict(state, assign=True, strict=True)
    return copy


# -- random streams ----------------------------------------------------------------------------------------------------
def seed_per_rank(trainer: L.Trainer) -> int | None:
    """Gives data-parallel rank r its own noise: python / numpy / torch restart from `seed + r` (the seed of
    `seed_everything`); returns that seed. Single-process runs are left untouched (None).

    `seed_everything` seeds every rank alike, so without this all ranks would draw the same ε, t and inner noise
    for their different samples, and a global batch would hold only one rank's worth of noise draws.
    """
    seed = os.environ.get("PL_GLOBAL_SEED")
    if trainer.world_size <= 1 or seed is None:
        return None
    rank_seed = int(seed) + trainer.global_rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    return rank_seed

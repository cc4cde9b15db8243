"""Setup guards of `python -m tmd_lightning.fit`: mistakes a composed config shows before any weight is loaded.

`check_config` runs on the composed config before the data, the stage or the trainer is built, and stops with a
one-line `ValueError` that names the override to set:

- toy evaluation on real data: the toy callback (`ToyEvalCallback`) or the toy prompts (`prompts: toy`) in a run
  whose data is not the toy world (a cache or a manifest for a Wan model) -> `callbacks=real`;
- LoRA under FSDP2 (`stage.lora.fake_score` / `stage.lora.student` with `trainer=fsdp`), which the stage refuses only
  after loading the weights -> `trainer=ddp` or the LoRA flags off;
- memory, where the per-GPU memory is known (`gpu_memory_gib`, else the CUDA device's): the memory plan
  (`tmd_lightning.planning`, docs/plan.md) of the run's stage, model, strategy and micro batch, with and without
  activation checkpointing -> `stage.activation_checkpointing=true`, `data.batch_size=1`, or what else would fit;
- the global batch (`stage.global_batch`) must divide into world size x micro batch.

`accumulation` turns `stage.global_batch` into Lightning's `accumulate_grad_batches` for the stages that Lightning
optimises (adapt_head, kd_warmup, teacher); the distill stages (manual optimisation) read `global_batch` themselves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR

log = logging.getLogger(__name__)
GIB = 1024**3
# stage `_target_` -> the plan's column for it (stages the plan does not model are not checked for memory)
PLAN_STAGES = {"tmd_lightning.stages.AdaptHeadStage": "adapt_head",
               "tmd_lightning.stages.TMDDistillStage": "distill",
               "tmd_lightning.stages.DMD2Stage": "distill_dmd2"}
MANUAL_STAGES = ("tmd_lightning.stages.TMDDistillStage", "tmd_lightning.stages.DMD2Stage")  # manual optimisation


# -- what the config describes --------------------------------------------------------------------------------------
def is_toy_run(cfg: DictConfig) -> bool:
    """The toy world's data (`data.toy`) or the toy model (whose caches hold toy captions)."""
    return bool(cfg.data.get("toy")) or cfg.model.get("name") == "toy"


def is_fsdp(cfg: DictConfig) -> bool:
    """`trainer=fsdp`: Lightning's ModelParallelStrategy (our FSDP2Strategy) or an FSDP strategy name."""
    spec = cfg.trainer.get("strategy", "auto")
    text = str(spec.get("_target_", "") if isinstance(spec, DictConfig) else spec).lower()
    return "fsdp" in text or "modelparallel" in text


def world_size(cfg: DictConfig) -> int:
    """Processes in the run: `trainer.devices` (a count or a list of ids) x `trainer.num_nodes`; for `auto` / -1 the
    launcher's WORLD_SIZE, else the visible CUDA devices (1 on CPU) x `trainer.num_nodes`."""
    devices = cfg.trainer.get("devices", 1)
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, str):
        text = devices.strip()
        devices = int(text) if text.lstrip("-").isdigit() else ([d for d in text.split(",") if d.strip()]
                                                                   if "," in text else text)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices) * nodes
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    import torch

    cuda = str(cfg.trainer.get("accelerator", "auto")) != "cpu" and torch.cuda.is_available()
    return (torch.cuda.device_count() if cuda else 1) * nodes


def accumulation(cfg: DictConfig) -> int | None:
    """Micro batches per optimizer step that make `stage.global_batch` (None when it is not set): global batch /
    (world size x `data.batch_size`), an error when that is not a whole number."""
    global_batch = cfg.stage.get("global_batch")
    if global_batch is None:
        return None
    world, micro = world_size(cfg), int(cfg.data.batch_size)
    steps, rest = divmod(int(global_batch), world * micro)
    if rest or steps < 1:
        raise ValueError(f"stage.global_batch={global_batch} is not a multiple of {world} GPU(s) x data.batch_size="
                         f"{micro}: set stage.global_batch to a multiple of {world * micro} (or change "
                         "trainer.devices / trainer.num_nodes / data.batch_size)")
    return steps


def apply_accumulation(cfg: DictConfig) -> int | None:
    """For a stage Lightning optimises, sets `trainer.accumulate_grad_batches` from `stage.global_batch` (an error if
    the trainer config asks for another value); the distill stages accumulate themselves. Returns the value."""
    steps = accumulation(cfg)
    if steps is None or cfg.stage.get("_target_") in MANUAL_STAGES:
        return steps
    asked = cfg.trainer.get("accumulate_grad_batches")
    if asked is not None and int(asked) != steps:
        raise ValueError(f"trainer.accumulate_grad_batches={asked} contradicts stage.global_batch="
                         f"{cfg.stage.global_batch} ({world_size(cfg)} GPU(s) x data.batch_size={cfg.data.batch_size}"
                         f" needs {steps}): set only one of them (stage.global_batch=null to accumulate by hand)")
    OmegaConf.update(cfg, "trainer.accumulate_grad_batches", steps, force_add=True)
    log.info("global batch %s = %d GPU(s) x micro batch %s x accumulation %d", cfg.stage.global_batch,
             world_size(cfg), cfg.data.batch_size, steps)
    return steps


# -- the guards ------------------------------------------------------------------------------------------------------
def check_toy_evaluation(cfg: DictConfig) -> None:
    """No toy callback and no toy prompts on real data."""
    if is_toy_run(cfg):
        return
    for name, cb in (cfg.get("callbacks") or {}).items():
        if not isinstance(cb, DictConfig):
            continue
        if str(cb.get("_target_", "")).endswith("ToyEvalCallback"):
            raise ValueError(f"callbacks.{name} (ToyEvalCallback) samples the toy world's prompts, which this run's "
                             f"data ({cfg.data._target_}) does not hold: set callbacks=real")
        if cb.get("prompts") == "toy":
            raise ValueError(f"callbacks.{name}.prompts=toy: the toy captions are not in this run's data "
                             f"({cfg.data._target_}): set callbacks.{name}.prompts=FILE or null (validation captions)")


def check_lora_strategy(cfg: DictConfig) -> None:
    """LoRA mode is not supported under FSDP2."""
    lora = cfg.stage.get("lora") or {}
    on = [k for k in ("fake_score", "student") if lora.get(k)]
    if on and is_fsdp(cfg):
        flags = " ".join(f"stage.lora.{k}=false" for k in on)
        raise ValueError(f"LoRA ({', '.join(f'stage.lora.{k}' for k in on)}) is not supported under FSDP2 "
                         f"(trainer=fsdp): set trainer=ddp, or {flags}")


def gpu_memory_gib(cfg: DictConfig) -> float | None:
    """The per-GPU memory to check: `gpu_memory_gib`, else the CUDA device's when the run trains on one, else None."""
    if cfg.get("gpu_memory_gib") is not None:
        return float(cfg.gpu_memory_gib)
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def plan_config(cfg: DictConfig) -> DictConfig:
    """The `plan` config of this run: configs/plan.yaml's defaults with the run's model, student shape, trainer (its
    device count made explicit), micro batch, clip size, frozen-teacher dtype, GAN, LoRA and whether the encoders sit
    on the GPU (not with a precompute cache)."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "plan.yaml")
    stage = cfg.stage
    world, nodes = world_size(cfg), int(cfg.trainer.get("num_nodes", 1) or 1)
    trainer = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=False))
    trainer.devices = max(world // nodes, 1)
    disc = stage.get("discriminator")
    width = disc.get("hidden_dim") if isinstance(disc, DictConfig) else None
    plan = OmegaConf.create({
        "model": cfg.model, "tmd": cfg.tmd, "trainer": trainer, "strategy": None,
        "micro_batch": int(cfg.data.batch_size),
        "video": {"num_frames": cfg.data.num_frames, "height": cfg.data.height, "width": cfg.data.width},
        "frozen_dtype": stage.get("teacher_dtype", "bfloat16"),
        "discriminator_hidden_dim": width if width is not None else cfg.model.disc_width,
        "use_gan": bool(stage.get("use_gan", True)),
        "encoders_on_gpu": "Cached" not in str(cfg.data.get("_target_", "")),
        "autocast_weight_cache": base.autocast_weight_cache,
        "fsdp_param_dtype": (trainer.strategy.get("param_dtype", base.fsdp_param_dtype)
                             if isinstance(trainer.get("strategy"), DictConfig) else base.fsdp_param_dtype),
        "fd_full_precision": bool(stage.get("fd_full_precision", True)),
        "lora": {k: (stage.lora if "lora" in stage else base.lora)[k] for k in base.lora},
    })
    if stage.get("M") is not None:  # the stage's own M / N where the command line set them there
        plan.tmd.M = stage.M
    if stage.get("N") is not None:
        plan.tmd.N = stage.N
    return plan


def planned_gib(cfg: DictConfig, stage: str, micro_batch: int, checkpointing: bool) -> float:
    """The plan's per-GPU peak (GiB) of `stage` for this run at `micro_batch`, with or without checkpointing."""
    from tmd_lightning import planning as P

    pcfg = plan_config(cfg)
    pcfg.micro_batch = micro_batch
    lora = pcfg.lora
    mode = "LoRA both" if lora.get("fake_score") and lora.get("student") else \
        "LoRA fake" if lora.get("fake_score") else "full"  # a LoRA student alone: the full column, an upper bound
    networks = P.build_networks(pcfg)
    counts = P.count_all(networks, pcfg.lora)
    sizes = P.sizes(pcfg, networks["codec"], P.wan_architecture(pcfg.model))
    totals = P.iteration_totals(stage, mode, counts, sizes, P.make_setup(pcfg), pcfg, checkpointing)
    return max(totals.values()) / GIB


def check_memory(cfg: DictConfig) -> None:
    """The micro batch and activation checkpointing against the memory plan, where the GPU memory is known."""
    stage = PLAN_STAGES.get(str(cfg.stage.get("_target_", "")))
    limit = gpu_memory_gib(cfg)
    if not cfg.get("memory_guard", True) or stage is None or limit is None:
        return
    micro, ckpt = int(cfg.data.batch_size), bool(cfg.stage.get("activation_checkpointing", False))
    need = planned_gib(cfg, stage, micro, ckpt)
    if need <= limit:
        return
    where = f"{stage} of {cfg.model.name} at data.batch_size={micro}"
    if not ckpt and planned_gib(cfg, stage, micro, True) <= limit:
        raise ValueError(f"{where} needs {need:.0f} GiB per GPU without activation checkpointing (the memory plan; "
                         f"{limit:.0f} GiB here): set stage.activation_checkpointing=true")
    fix = "" if ckpt else "stage.activation_checkpointing=true "
    best = planned_gib(cfg, stage, 1, True)
    if micro > 1 and best <= limit:
        raise ValueError(f"{where} needs {need:.0f} GiB per GPU (the memory plan; {limit:.0f} GiB here): set "
                         f"{fix}data.batch_size=1 (stage.global_batch keeps the global batch through accumulation)")
    smallest = f"{fix}data.batch_size=1 and " if fix or micro > 1 else ""
    raise ValueError(f"{where} needs {need:.0f} GiB per GPU, {best:.0f} GiB at best (data.batch_size=1, "
                     f"checkpointing; the memory plan, {limit:.0f} GiB here): set {smallest}more GPUs "
                     f"(trainer.num_nodes=N) or LoRA under trainer=ddp (stage.lora.fake_score=true), or "
                     f"memory_guard=false to try anyway (python -m tmd_lightning.plan model={cfg.model.name})")

def check_config(cfg: DictConfig) -> None:
    """Every setup guard, in the order a user would fix them (see the module docstring)."""
    check_toy_evaluation(cfg)
    check_lora_strategy(cfg)
    accumulation(cfg)
    check_memory(cfg)


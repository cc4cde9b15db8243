"""The whole plan of one config: every network built on the meta device and counted, the memory of every
(stage, mode) column, and the verdict per GPU size of `verdict_gpus`. Computes only; `tables` formats."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tmd_lightning.planning.counts import count_all
from tmd_lightning.planning.iterations import COLUMNS
from tmd_lightning.planning.memory import stage_memory
from tmd_lightning.planning.networks import build_networks, wan_architecture
from tmd_lightning.planning.run_setup import Setup, make_setup
from tmd_lightning.planning.shapes import sizes
from tmd_lightning.planning.units import GIB


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


def plan(cfg: DictConfig) -> dict[str, Any]:
    """Counts, sizes, setup, per-GPU memory of every (stage, mode) column and the verdicts, without printing."""
    networks = build_networks(cfg)
    counts = count_all(networks, cfg.lora)
    s = sizes(cfg, networks["codec"], wan_architecture(cfg.model))
    setup = make_setup(cfg)
    mem = {col: stage_memory(*col, counts, s, setup, cfg) for col in columns(cfg)}
    ckpt = bool(cfg.get("activation_checkpointing", True))
    return {"counts": counts, "sizes": s, "setup": setup, "memory": mem, "verdicts": verdicts(mem, setup, cfg, ckpt)}

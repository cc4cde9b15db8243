"""How a run is spread: the strategy (single, DDP or FSDP), the world size and the precision, read from the
`trainer` config (or the plan's own `strategy` key). They decide what each GPU holds: DDP replicates, FSDP divides
parameters, gradients, optimizer states and the teacher by the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

STRATEGIES = ("single", "ddp", "fsdp")


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
class Setup:
    """How the run is spread: strategy, world size, precision and the strategy's options."""

    strategy: str
    world: int
    precision: Precision
    bucket_view: bool = False  # DDP's gradient_as_bucket_view (no second gradient copy)


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

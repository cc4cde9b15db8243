"""Exports the trained network (EMA weights when an EMA callback is present) as a diffusers folder at the end."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from torch.distributed.tensor import DTensor

from tmd_lightning.callbacks.ema import find_ema
from tmd_lightning.callbacks.finite import find_guard
from tmd_lightning.runtime.finite import MAX_ABS_WEIGHT, agreed, all_finite

log = logging.getLogger(__name__)


class ExportPretrained(L.Callback):
    """On train end calls `pl_module.export_pretrained(dirpath)` with EMA weights swapped in.

    Not under `fast_dev_run` (a smoke test exports nothing), and never non-finite or unbounded weights (the bound
    of the run's `FiniteGuard`). Rank 0 writes. A sharded (FSDP2) network is gathered first, which every rank must
    join, so then every rank calls `export_pretrained` (and only rank 0 writes); otherwise only rank 0 calls it.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        network = getattr(pl_module, "network", None)
        sharded = network is not None and any(isinstance(p, DTensor) for p in network.parameters())
        if not trainer.is_global_zero and not sharded:
            return
        ema = find_ema(trainer)
        if trainer.is_global_zero:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        guard = find_guard(trainer)
        bound = guard.max_abs_weight if guard is not None else MAX_ABS_WEIGHT
        with ema.swapped(pl_module) if ema is not None else nullcontext():
            if not agreed(trainer, all_finite(pl_module.network.parameters(), bound)):
                raise FloatingPointError(f"the trained weights are non-finite or exceed {bound:g}: not exporting "
                                         f"them to {self.dirpath}")
            pl_module.export_pretrained(self.dirpath)
        if trainer.is_global_zero:
            log.info("exported %s to %s", type(pl_module).__name__, self.dirpath)

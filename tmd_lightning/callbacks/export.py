"""Exports the trained network (EMA weights when an EMA callback is present) as a diffusers folder at the end."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from tmd_lightning.callbacks.ema import find_ema

log = logging.getLogger(__name__)


class ExportPretrained(L.Callback):
    """On train end (rank 0), calls `pl_module.export_pretrained(dirpath)` with EMA weights swapped in."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ema = find_ema(trainer)
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        if ema is not None:
            with ema.swapped(pl_module):
                pl_module.export_pretrained(self.dirpath)
        else:
            pl_module.export_pretrained(self.dirpath)
        log.info("exported %s to %s", type(pl_module).__name__, self.dirpath)

"""Logs the DataModule's skipped-sample counters once per epoch (docs/method.md §7: nothing is lost silently)."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class SkippedSamplesLogger(L.Callback):
    """Logs `data/skipped_epoch`, `data/skipped_total`, `data/skipped_fraction` and `data/skipped_batches` (batches
    without any usable sample, whose steps were skipped) at the end of each epoch."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skips = getattr(trainer.datamodule, "skips", None)
        if skips is None:
            return
        metrics = {"data/skipped_epoch": float(skips.epoch_skipped), "data/skipped_total": float(len(skips.skipped)),
                   "data/skipped_fraction": len(skips.skipped) / max(skips.seen, 1),
                   "data/skipped_batches": float(getattr(skips, "empty_batches", 0))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if skips.epoch_skipped:
            log.warning("epoch %d: skipped %d samples (%d in total, %.2f%%)", trainer.current_epoch,
                        skips.epoch_skipped, len(skips.skipped), 100 * metrics["data/skipped_fraction"])
        skips.epoch_skipped = 0

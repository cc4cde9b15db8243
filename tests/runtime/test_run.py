"""The objects of a run (tmd_lightning/runtime/run.py): no LearningRateMonitor without a logger."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor

from tmd_lightning.runtime.run import without_lr_monitor


def test_no_lr_monitor_without_a_logger() -> None:
    callbacks = [LearningRateMonitor(), object()]
    assert without_lr_monitor(callbacks, []) == callbacks[1:]
    assert without_lr_monitor(callbacks, [object()]) == callbacks

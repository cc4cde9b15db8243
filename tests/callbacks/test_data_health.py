"""Skipped samples reach the logger once per epoch, and the epoch counter resets."""

from __future__ import annotations

from types import SimpleNamespace

from tmd_lightning.callbacks import SkippedSamplesLogger
from tmd_lightning.data.dataset import SkipCounter, SkipRecord


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def test_skips_are_logged_per_epoch_and_reset() -> None:
    skips = SkipCounter(max_fraction=1.0)
    skips.update(10, [SkipRecord("a.mp4", "corrupt"), SkipRecord("b.mp4", "too short")])
    skips.update(1, [SkipRecord("c.mp4", "corrupt")], empty_batch=True)
    logger = _Logger()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(skips=skips), loggers=[logger], global_step=7,
                              current_epoch=0)
    callback = SkippedSamplesLogger()
    callback.on_train_epoch_end(trainer, None)
    skips.update(10, [])
    callback.on_train_epoch_end(trainer, None)
    (first, step), (second, _) = logger.logged
    assert step == 7 and first["data/skipped_epoch"] == 3 and first["data/skipped_fraction"] == 3 / 11
    assert first["data/skipped_batches"] == 1  # a batch with no usable sample: its step was skipped
    assert second["data/skipped_epoch"] == 0 and second["data/skipped_total"] == 3

"""`ModelCheckpoint` whose `last.ckpt` is always the final state of a run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalStateCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, plus: `last.ckpt` is rewritten at the end of training.

    Lightning writes `last` only together with a periodic checkpoint, so a run of 600 steps with a period of 500
    ends with `last.ckpt` at step 500; the next stage (which starts from `last.ckpt`) and `ckpt_path=` resumes would
    silently use a state 100 steps old. This subclass saves the final state as `last` when it is newer.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # `_last_global_step_saved` is Lightning's own record of the step its last save happened at
        if self.save_last and not trainer.sanity_checking and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

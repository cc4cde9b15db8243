"""`ModelCheckpoint` whose `last.ckpt` is always the final state of a run (also when the run is pre-empted), and
which moves the stage's `latest` link to its run once there is a checkpoint to find there."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def link_latest(link: Path, target: Path) -> Path:
    """Points the symlink `link` at the folder `target` (a relative link, replaced atomically)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    return link


class FinalStateCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, plus: `last.ckpt` is rewritten at the end of training, and a `latest` link set
    with `link_latest_on_save` is moved once the first checkpoint is on disk.

    Lightning writes `last` only together with a periodic checkpoint, so a run of 600 steps with a period of 500
    ends with `last.ckpt` at step 500; the next stage (which starts from `last.ckpt`) and `ckpt_path=` resumes would
    silently use a state 100 steps old. This subclass saves the final state as `last` when it is newer.

    Pre-emption: on SIGTERM (and SIGUSR1 outside SLURM) Lightning finishes the current step and stops with
    `SIGTERMException`; this callback then writes `last.ckpt` (resumable with `ckpt_path=`) before the process exits.
    Under SLURM with auto-requeue, Lightning's own SIGUSR1 handler saves and requeues the job instead.
    """

    _latest: tuple[Path, Path] | None = None
    _previous_sigusr1: signal.Handlers | None = None

    def link_latest_on_save(self, link: str | Path, run_dir: str | Path) -> None:
        """After this callback first writes a checkpoint, point `link` at `run_dir`. A run that fails before that
        (or never checkpoints, like `fast_dev_run`) leaves `link` where it was: on a run that can be resumed or
        started from."""
        self._latest = (Path(link), Path(run_dir))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # written (and every rank past the barrier) when it returns
        if self._latest is not None and trainer.is_global_zero:
            link_latest(*self._latest)
            self._latest = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if hasattr(signal, "SIGUSR1") and not slurm_requeue and signal.getsignal(signal.SIGUSR1) in (
                signal.SIG_DFL, None):
            def stop_like_sigterm(signum: int, frame: FrameType | None) -> None:
                # Lightning's own flag for SIGTERM: the loop stops after the current step
                trainer._signal_connector.received_sigterm = True

            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, stop_like_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.fast_dev_run:
            return
        self.last_model_path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        self._save_checkpoint(trainer, self.last_model_path)  # also with save_last=false: the resume needs it
        if trainer.is_global_zero:
            log.warning("pre-empted at step %d: saved %s (resume with ckpt_path=%s)", trainer.global_step,
                        self.last_model_path, self.last_model_path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test writes no checkpoint (Lightning's own on_train_end would write `last`)
            return
        super().on_train_end(trainer, pl_module)
        # Lightning's own test: not under fast_dev_run, not when the last save happened at this very step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

"""What a training run (`python -m tmd_lightning.fit`) does around `trainer.fit`: the config checked before anything
is built, the objects its config groups name, and the run's folder.

Runs land in `logs/<task_name>/runs/<timestamp>/` (`config.yaml`, the hyperparameters of `hparams.py`);
`logs/<task_name>/latest` points at the newest one that has written a checkpoint (moved when its first checkpoint is
on disk), which is how the next stage finds the previous stage's checkpoint. A run that fails before its first
checkpoint leaves `latest` where it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.callbacks.checkpoint import FinalStateCheckpoint
from tmd_lightning.checkpoints import check_checkpoint
from tmd_lightning.guards import apply_accumulation, check_config, is_fsdp
from tmd_lightning.runtime.hparams import log_hparams

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ before anything


def check_run(cfg: DictConfig) -> tuple[list[Any], str | None]:
    """Checks the config before any weight is loaded; returns what a resume needs: the objects the stage's
    checkpoints may hold (for `safe_loading`) and `ckpt_path` checked (resolved through `latest`), or None.

    One-line errors for what the config shows to be wrong (`guards.py`); `stage.global_batch` becomes
    `trainer.accumulate_grad_batches` (Lightning-optimised stages)."""
    check_config(cfg)
    apply_accumulation(cfg)
    trusted = partial_targets(OmegaConf.to_container(cfg.stage, resolve=True))
    ckpt_path = str(check_checkpoint(cfg.ckpt_path, "ckpt_path", trusted)) if cfg.get("ckpt_path") else None
    return trusted, ckpt_path


def partial_targets(node: Any) -> list[Any]:
    """The objects behind every `_partial_: true` `_target_` of a config (a stage's optimizer and scheduler): what
    the stage's hyperparameters, and so its checkpoints, hold. The run's own config names them, so a resume may
    unpickle them."""
    if isinstance(node, dict):
        found = [get_object(node["_target_"])] if node.get("_partial_") and "_target_" in node else []
        return found + [t for v in node.values() for t in partial_targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in partial_targets(v)]
    return []


# ------------------------------------------------------------------------------------------------ the objects


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every object a config group (`callbacks`, `logger`) names with a `_target_`."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def without_lr_monitor(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """The callbacks, less `LearningRateMonitor` when the run has no logger (`logger=none`), which it would refuse at
    the start of training."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if loggers:
        return callbacks
    dropped = [cb for cb in callbacks if isinstance(cb, LearningRateMonitor)]
    if dropped:
        log.info("no logger (logger=none): LearningRateMonitor left out, it has nowhere to log")
    return [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]


def meta_init(cfg: DictConfig) -> bool:
    """Whether ranks > 0 build the stage's networks on the meta device: FSDP2 runs (`trainer=fsdp`) with the
    strategy's `meta_init` (true by default)."""
    spec = cfg.trainer.get("strategy")
    return is_fsdp(cfg) and isinstance(spec, DictConfig) and bool(spec.get("meta_init", True))


# ------------------------------------------------------------------------------------------------ the run's folder


def link_latest_on_first_checkpoint(trainer: L.Trainer, latest: Path, output_dir: Path) -> bool:
    """Has the run's checkpoint callback point `latest` at this run once it has written a checkpoint; False when no
    callback can (then `latest` stays where it is)."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, FinalStateCheckpoint)]
    for callback in callbacks:
        callback.link_latest_on_save(latest, output_dir)
    return bool(callbacks)


class RunFolder:
    """The run's folder (`paths.output_dir`) and its task's `latest` link."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.paths.output_dir)
        self.latest = Path(cfg.paths.log_dir) / cfg.task_name / "latest"
        self.links = False

    def open(self, trainer: L.Trainer, callbacks: list[Any]) -> None:
        """On global rank 0, the folder with the run's `config.yaml` (as composed, unresolved) and the
        hyperparameters; on every rank, `latest` set to move here with the first checkpoint."""
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=False))
            log_hparams(trainer, self.cfg, callbacks)
        self.links = link_latest_on_first_checkpoint(trainer, self.latest, self.output_dir)

    def report(self, trainer: L.Trainer) -> str | None:
        """Prints where the outputs went (folder, `latest`, checkpoint, export, TensorBoard); returns the last
        checkpoint's path, or None."""
        paths = self.cfg.paths
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        linked = self.links and self.latest.is_symlink() and self.latest.resolve() == self.output_dir.resolve()
        print(f"\nrun folder:   {self.output_dir}\nlatest link:  {self.latest}" + ("" if linked else " (not moved: "
              "this run wrote no checkpoint)"))
        if ckpt:
            print(f"checkpoint:   {ckpt}")
        if paths.get("export_dir") and Path(paths.export_dir).exists():
            print(f"export:       {paths.export_dir}")
        print(f"tensorboard:  tensorboard --logdir {paths.log_dir}")
        return ckpt

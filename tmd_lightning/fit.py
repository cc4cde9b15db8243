"""Entry point: `python -m tmd_lightning.fit experiment=NAME [overrides]`.

Instantiates data, stage, callbacks, loggers and trainer from the config, fits, and says where the outputs went.
Runs land in `logs/<task_name>/runs/<timestamp>/`; `logs/<task_name>/latest` points at the newest one that has written
a checkpoint (moved when its first checkpoint is on disk), which is how the next stage finds the previous stage's
checkpoint, and `ckpt_path=logs/<task_name>/latest/checkpoints/last.ckpt` resumes, without an extra argument. A run
that fails before its first checkpoint leaves `latest` where it was (`runtime/run.py`).

TensorBoard gets the resolved config as hyperparameters (flattened, `trainer/max_steps`), with the final numbers of
the sampling evaluations (`toy/acc_joint`, `toy/fd`, ...) as their metrics, so the HParams tab compares runs
(`runtime/hparams.py`).
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from tmd_lightning.checkpoints import safe_loading
from tmd_lightning.config import hydra_entry
from tmd_lightning.models.rank0 import rank0_weights
from tmd_lightning.runtime.run import RunFolder, check_run, instantiate_group, meta_init, without_lr_monitor

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fits one stage from a composed config; returns the trainer's final metrics and output paths."""
    trusted, ckpt_path = check_run(cfg)  # before anything is built, generated or linked
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    with rank0_weights(meta_init(cfg)):  # FSDP2: ranks > 0 build the networks on meta (models/rank0.py)
        stage = instantiate(cfg.stage)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = without_lr_monitor(instantiate_group(cfg.get("callbacks")), loggers)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    folder = RunFolder(cfg)
    folder.open(trainer, callbacks)  # config.yaml and hyperparameters; `latest` moves with the first checkpoint
    with safe_loading(trusted):  # a resume unpickles only tensors, plain containers and the allow-list
        trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    result = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        result["checkpoint"] = folder.report(trainer)
    return result


@hydra_entry("fit")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SIGTERMException:  # pre-empted: `last.ckpt` is saved; a non-zero status tells the scheduler so
        raise SystemExit(PREEMPTED_EXIT_CODE) from None


if __name__ == "__main__":
    main()

"""Entry point: `python -m tmd_lightning.fit experiment=NAME [overrides]`.

Instantiates data, stage, callbacks, loggers and trainer from the config, fits, and says where the outputs went.
Runs land in `logs/<task_name>/runs/<timestamp>/`; `logs/<task_name>/latest` points at the newest one (from the moment
it starts), which is how the next stage finds the previous stage's checkpoint without an extra argument.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers

log = logging.getLogger(__name__)
register_resolvers()


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def _link_latest(output_dir: Path, stage_dir: Path) -> Path:
    """`logs/<task_name>/latest` -> this run's folder (relative symlink, replaced atomically)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    latest = stage_dir / "latest"
    tmp = latest.with_name(".latest.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(output_dir, latest.parent), tmp)
    os.replace(tmp, latest)
    return latest


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fits one stage from a composed config; returns the trainer's final metrics and output paths."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    stage = instantiate(cfg.stage)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    stage_dir = Path(cfg.paths.log_dir) / cfg.task_name
    if trainer.is_global_zero:  # linked at the start, so an interrupted run is found (and resumed) too
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
        latest = _link_latest(output_dir, stage_dir)
    # our checkpoints carry their hyperparameters (optimizer partials), which torch's weights_only loader rejects;
    # `ckpt_path` is a file the user chose to resume from
    trainer.fit(stage, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    result = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        print(f"\nrun folder:   {output_dir}\nlatest link:  {latest}")
        if ckpt:
            print(f"checkpoint:   {ckpt}")
        for name in ("export_dir",):
            if cfg.paths.get(name):
                print(f"export:       {cfg.paths[name]}")
        print(f"tensorboard:  tensorboard --logdir {cfg.paths.log_dir}")
        result["checkpoint"] = ckpt
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="fit")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

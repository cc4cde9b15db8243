"""Entry point: `python -m tmd_lightning.fit experiment=NAME [overrides]`.

Instantiates data, stage, callbacks, loggers and trainer from the config, fits, and says where the outputs went.
Runs land in `logs/<task_name>/runs/<timestamp>/`; `logs/<task_name>/latest` points at the newest one that has written
a checkpoint (moved when its first checkpoint is on disk), which is how the next stage finds the previous stage's
checkpoint, and `ckpt_path=logs/<task_name>/latest/checkpoints/last.ckpt` resumes, without an extra argument. A run
that fails before its first checkpoint leaves `latest` where it was.

TensorBoard gets the resolved config as hyperparameters (flattened, `trainer/max_steps`), with the final numbers of
the sampling evaluations (`toy/acc_joint`, `toy/fd`, ...) as their metrics, so the HParams tab compares runs.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import get_object, instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.callbacks.checkpoint import FinalStateCheckpoint
from tmd_lightning.checkpoints import check_checkpoint, safe_loading
from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.guards import apply_accumulation, check_config, is_fsdp
from tmd_lightning.models.rank0 import rank0_weights
from tmd_lightning.quiet import quiet_third_party

log = logging.getLogger(__name__)
register_resolvers()
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def _partial_targets(node: Any) -> list[Any]:
    """The objects behind every `_partial_: true` `_target_` of a config (a stage's optimizer and scheduler): what
    the stage's hyperparameters, and so its checkpoints, hold. The run's own config names them, so a resume may
    unpickle them."""
    if isinstance(node, dict):
        found = [get_object(node["_target_"])] if node.get("_partial_") and "_target_" in node else []
        return found + [t for v in node.values() for t in _partial_targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _partial_targets(v)]
    return []


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


def _link_latest_on_first_checkpoint(trainer: L.Trainer, latest: Path, output_dir: Path) -> bool:
    """Has the run's checkpoint callback point `latest` at this run once it has written a checkpoint; False when no
    callback can (then `latest` stays where it is)."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, FinalStateCheckpoint)]
    for callback in callbacks:
        callback.link_latest_on_save(latest, output_dir)
    return bool(callbacks)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as `group/key: value`, interpolations resolved where they can be (else kept as written: outside
    Hydra `${hydra:...}` does not resolve), lists and None as text: what TensorBoard's HParams tab takes."""
    out: dict[str, Any] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            name = f"{prefix}{key}"
            try:
                value = node[key]
                if isinstance(value, DictConfig):
                    walk(value, f"{name}/")
                    continue
                if OmegaConf.is_config(value):
                    value = OmegaConf.to_container(value, resolve=True)
            except Exception:  # an interpolation or a missing value that does not resolve here
                value = node._get_node(key)._value()
                if OmegaConf.is_config(value):
                    value = OmegaConf.to_yaml(value).strip()
            out[name] = value if isinstance(value, bool | int | float | str) else str(value)

    walk(cfg, "")
    return out


def hparam_metrics(callbacks: list[Any]) -> list[str]:
    """The scalar names the run's sampling evaluations log at the end of training: the HParams tab's metrics."""
    return list(dict.fromkeys(m for cb in callbacks if hasattr(cb, "hparam_metrics") for m in cb.hparam_metrics()))


def log_hparams(trainer: L.Trainer, cfg: DictConfig, callbacks: list[Any]) -> dict[str, Any]:
    """Writes the flattened config as hyperparameters to every TensorBoard logger, with `hparam_metrics` as the
    session's metrics (no placeholder values: the evaluations log those scalars under the same names). Other loggers
    get the hyperparameters only. Returns the flattened config."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    params = flat_config(cfg)
    metrics = hparam_metrics(callbacks)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.hparams.update(params)  # hparams.yaml beside the events
            writer = logger.experiment._get_file_writer()
            for summary in hparams(params, dict.fromkeys(metrics, 0.0)):
                writer.add_summary(summary)
            logger.experiment.flush()
        else:
            logger.log_hyperparams(params)
    return params


def meta_init(cfg: DictConfig) -> bool:
    """Whether ranks > 0 build the stage's networks on the meta device: FSDP2 runs (`trainer=fsdp`) with the
    strategy's `meta_init` (true by default)."""
    spec = cfg.trainer.get("strategy")
    return is_fsdp(cfg) and isinstance(spec, DictConfig) and bool(spec.get("meta_init", True))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fits one stage from a composed config; returns the trainer's final metrics and output paths."""
    check_config(cfg)  # one-line errors for what the config shows to be wrong, before any weight is loaded
    apply_accumulation(cfg)  # stage.global_batch -> trainer.accumulate_grad_batches (Lightning-optimised stages)
    # resolved (through `latest`) and checked before anything is built, generated or linked
    trusted = _partial_targets(OmegaConf.to_container(cfg.stage, resolve=True))
    ckpt_path = str(check_checkpoint(cfg.ckpt_path, "ckpt_path", trusted)) if cfg.get("ckpt_path") else None
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    with rank0_weights(meta_init(cfg)):  # FSDP2: ranks > 0 build the networks on meta (models/rank0.py)
        stage = instantiate(cfg.stage)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = without_lr_monitor(_instantiate_all(cfg.get("callbacks")), loggers)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    latest = Path(cfg.paths.log_dir) / cfg.task_name / "latest"
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
        log_hparams(trainer, cfg, callbacks)
    links = _link_latest_on_first_checkpoint(trainer, latest, output_dir)
    with safe_loading(trusted):  # a resume unpickles only tensors, plain containers and the allow-list
        trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    result = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        linked = links and latest.is_symlink() and latest.resolve() == output_dir.resolve()
        print(f"\nrun folder:   {output_dir}\nlatest link:  {latest}" + ("" if linked else " (not moved: this run "
              "wrote no checkpoint)"))
        if ckpt:
            print(f"checkpoint:   {ckpt}")
        if cfg.paths.get("export_dir") and Path(cfg.paths.export_dir).exists():
            print(f"export:       {cfg.paths.export_dir}")
        print(f"tensorboard:  tensorboard --logdir {cfg.paths.log_dir}")
        result["checkpoint"] = ckpt
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="fit")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    try:
        run(cfg)
    except SIGTERMException:  # pre-empted: `last.ckpt` is saved; a non-zero status tells the scheduler so
        raise SystemExit(PREEMPTED_EXIT_CODE) from None


if __name__ == "__main__":
    main()

"""A run's resolved config as TensorBoard hyperparameters (flattened, `trainer/max_steps`), with the final numbers of
the sampling evaluations (`toy/acc_joint`, `toy/fd`, ...) as their metrics, so the HParams tab compares runs."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf


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

"""The console during training: Lightning's rich progress bar counting steps, and a parameter table without the
columns that say nothing here (per-module train/eval mode, FLOPs, which Lightning leaves at 0 without a profile)."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose label is the optimizer step out of `max_steps`, not "Epoch 0/-2": the runs here are
    step-based with an endless (`max_epochs=-1`) data stream."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the label
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        iterations = getattr(trainer.lightning_module, "hparams", {}).get("max_iterations")
        total = total or iterations
        return f"step {trainer.global_step}" + (f"/{total}" if total else "")


class ParameterSummary(ModelSummary):
    """One line per top-level network: its class, parameters, and whether it trains."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **kwargs: Any) -> None:
        columns = dict(summary_data)
        rows = zip(columns.get("Name", []), columns.get("Type", []), columns.get("Params", []), strict=False)
        width = max((len(n) for n in columns.get("Name", [])), default=4)
        lines = [f"  {name:<{width}}  {kind:<24} {params:>8}" for name, kind, params in rows]
        frozen = total_parameters - trainable_parameters
        lines.append(f"  trained {get_human_readable_count(trainable_parameters)}, frozen "
                     f"{get_human_readable_count(frozen)} ({model_size:.1f} MB)")
        log.info("networks:\n%s", "\n".join(lines))

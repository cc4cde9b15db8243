"""The NaN guard every stage shares (its checks: `runtime/finite.py`): a run stops on its first non-finite loss or
gradient, never writes a checkpoint or export whose weights are non-finite or unbounded, and names the last
checkpoint it can resume from.

A diverging run (too high a learning rate, bf16 overflow, a corrupt batch) otherwise goes on for hours on NaN
weights, exports them and exits 0. Checking before each optimizer step means the weights of the step that failed
are never updated with a NaN; checking at every save means each checkpoint on disk passed the bound, so the newest
one is the "last good" state — not merely the previous iteration, which may already be diverging.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from tmd_lightning.callbacks.ema import find_ema
from tmd_lightning.runtime.finite import MAX_ABS_WEIGHT, agreed, all_finite, non_finite_error

log = logging.getLogger(__name__)


class FiniteGuard(L.Callback):
    """Stops training on a non-finite loss or gradient; refuses to save or export non-finite or unbounded weights.

    Args:
        max_abs_weight: the largest weight magnitude (trained weights and their EMA) a checkpoint may hold.
    """

    def __init__(self, max_abs_weight: float = MAX_ABS_WEIGHT) -> None:
        self.max_abs_weight = max_abs_weight

    @staticmethod
    def _step(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        iteration = getattr(pl_module, "iteration", None)
        return f"iteration {iteration}" if iteration is not None else f"step {trainer.global_step}"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not agreed(trainer, all_finite([loss])):
            raise non_finite_error(trainer, f"loss at {self._step(trainer, pl_module)}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not agreed(trainer, all_finite(grads)):
            raise non_finite_error(trainer, f"gradient at {self._step(trainer, pl_module)}")

    def weights_ok(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> bool:
        """The trained weights and their EMA are finite and within `max_abs_weight` (on every rank)."""
        tensors = [p for p in pl_module.parameters() if p.requires_grad]
        ema = find_ema(trainer) if trainer is not None else None
        if ema is not None:
            tensors += list(getattr(ema, "shadow", {}).values())
        return agreed(trainer, all_finite(tensors, self.max_abs_weight))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.weights_ok(trainer, pl_module):
            raise non_finite_error(trainer, f"or unbounded (|w| > {self.max_abs_weight:g}) weights at "
                                            f"{self._step(trainer, pl_module)}: not saving them")


def find_guard(trainer: L.Trainer | None) -> FiniteGuard | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, FiniteGuard)), None) if trainer else None

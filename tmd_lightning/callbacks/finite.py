"""The NaN guard every stage shares: a run stops on its first non-finite loss or gradient, never writes a checkpoint
or export whose weights are non-finite or unbounded, and names the last checkpoint it can resume from.

A diverging run (too high a learning rate, bf16 overflow, a corrupt batch) otherwise goes on for hours on NaN
weights, exports them and exits 0. Checking before each optimizer step means the weights of the step that failed
are never updated with a NaN; checking at every save means each checkpoint on disk passed the bound, so the newest
one is the "last good" state — not merely the previous iteration, which may already be diverging.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from tmd_lightning.callbacks.ema import find_ema

log = logging.getLogger(__name__)
MAX_ABS_WEIGHT = 1.0e4  # a trained Wan's weights stay below ~10 in magnitude; 1e4 means the run has blown up


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: Iterable[torch.Tensor], max_abs: float = float("inf")) -> bool:
    """Whether every tensor (this rank's shard of a DTensor) is finite with |value| <= max_abs."""
    tensors = [_local(t).detach() for t in tensors if t is not None and t.is_floating_point()]
    tensors = [t for t in tensors if t.numel()]  # a rank's shard may be empty (a 1-element parameter on 2 ranks)
    if not tensors:
        return True
    peaks = torch.stack([t.abs().amax().float() for t in tensors])  # inf/NaN propagate through amax
    return bool(torch.isfinite(peaks).all() and peaks.max() <= max_abs)


def agreed(trainer: L.Trainer | None, ok: bool) -> bool:
    """`ok` on every rank (a collective under data parallelism, so every rank stops together)."""
    if trainer is not None and trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
    return ok


def last_good_checkpoint(trainer: L.Trainer | None) -> Path | None:
    """The newest checkpoint of this run: every checkpoint written under the guard passed the weight bound."""
    callback = trainer.checkpoint_callback if trainer is not None else None
    if callback is None or not callback.dirpath or not Path(callback.dirpath).is_dir():
        return None
    found = sorted(Path(callback.dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def non_finite_error(trainer: L.Trainer | None, what: str) -> FloatingPointError:
    """The error that stops the run: what went non-finite, and where to resume from."""
    good = last_good_checkpoint(trainer)
    where = (f"; the last checkpoint with finite weights is {good} (resume with ckpt_path={good}, e.g. with a lower "
             "learning rate)") if good else "; no checkpoint was written before it"
    return FloatingPointError(f"non-finite {what}{where}")


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

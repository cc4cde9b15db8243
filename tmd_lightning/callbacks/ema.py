"""An exponential moving average of one submodule (the trained network only, never frozen teachers or critics).

Lightning's `EMAWeightAveraging` copies the whole LightningModule (teacher and critics included) and is not
shard-aware; this keeps a float32 shadow of just `target`, swaps it in for validation and sampling, and stores it
in the checkpoint so runs resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy


class EMA(L.Callback):
    """EMA of `pl_module.<target>`'s parameters with `decay`, updated every optimizer step after `start_step`.

    `enabled=False` keeps the callback configured but inert (distill's student EMA is off by default).
    """

    def __init__(self, decay: float = 0.999, target: str = "transformer", start_step: int = 0,
                 use_for_validation: bool = True, enabled: bool = True) -> None:
        self.decay, self.target, self.start_step, self.enabled = decay, target, start_step, enabled
        self.use_for_validation = use_for_validation
        self.shadow: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] = {}

    def _params(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        module = pl_module.get_submodule(self.target)
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuses sharded training at once: the shadow would be per-rank shards that the checkpoint (written by
        rank 0) cannot hold, and gathering a full float32 copy per save does not scale to the models FSDP2 is for."""
        if self.enabled and isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError(f"the EMA callback does not support {type(trainer.strategy).__name__} (FSDP2): disable "
                             "it (callbacks.ema.enabled=false) or train with trainer=ddp")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        params = self._params(pl_module)
        if not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        self.shadow = {n: s.to(params[n].device) for n, s in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.enabled or not getattr(pl_module, "ema_update_due", True):
            return  # disabled, or a stage (distill) says this batch did not change the target (a critic step)
        step = trainer.global_step
        params = self._params(pl_module)
        if step <= self.start_step:
            for n, p in params.items():
                self.shadow[n].copy_(p.detach())
            return
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: short runs still average sensibly
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - decay)

    @staticmethod
    @torch.no_grad()
    def _copy_into(params: dict[str, torch.nn.Parameter], source: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            p.copy_(source[n])

    @contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily loads the EMA weights into the target module (no-op before the first update)."""
        if not self.shadow:
            yield
            return
        params = self._params(pl_module)
        backup = {n: p.detach().clone() for n, p in params.items()}
        self._copy_into(params, self.shadow)
        try:
            yield
        finally:
            self._copy_into(params, backup)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.use_for_validation and self.shadow and not trainer.sanity_checking:
            params = self._params(pl_module)
            self._backup = {n: p.detach().clone() for n, p in params.items()}
            self._copy_into(params, self.shadow)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._backup:
            self._copy_into(self._params(pl_module), self._backup)
            self._backup = {}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "target": self.target, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])


def find_ema(trainer: L.Trainer) -> EMA | None:
    """The trainer's enabled EMA callback, if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA) and cb.enabled), None)

"""Finite checks shared by the NaN guard (`callbacks.FiniteGuard`), the export callback and Stage 2's per-loss checks:
whether tensors are finite and bounded, the same decision on every rank, and the error that names the checkpoint to
resume from."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

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



"""Every random generator's state (torch, numpy, python, CUDA) as plain types a `weights_only` checkpoint holds,
per rank: what makes a resumed run draw the same noise as an uninterrupted one."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """torch / numpy / python / CUDA generator states as tensors and plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)],
             "python": list(random.getstate()[1]) + [random.getstate()[0]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states() -> list[dict[str, Any]] | None:
    """Every rank's generator states (rank order) when several processes train; None in a single process.

    Collective: `on_save_checkpoint` runs on every rank, and only rank 0's checkpoint dict is written."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() \
            or torch.distributed.get_world_size() == 1:
        return None
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def restore_rng(record: dict[str, Any]) -> None:
    """This rank's generator states from a checkpoint: its own when the run had the same number of ranks, the single
    state of a one-process run; otherwise the per-rank streams set up at fit start are kept (and logged)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    by_rank = record.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world:
        set_rng_state(by_rank[rank])
    elif world == 1:
        set_rng_state(record["rng"])
    else:
        log.warning("checkpoint saved with %s rank(s), resumed with %d: random streams restart from seed + rank, "
                    "so the resumed run is not bit-exact", len(by_rank) if by_rank else 1, world)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

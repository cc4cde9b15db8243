"""Loading weights on global rank 0 only (FSDP2 meta-device initialisation, docs/method.md §9).

Under `trainer=fsdp` every rank builds the stage, but only global rank 0 needs to read the weights: the other ranks
build each network on the meta device (shapes, no memory), `runtime.parallel.shard_stage` shards it, allocates only
the local shards (`to_empty`) and fills them from rank 0 (`set_model_state_dict(..., broadcast_from_rank0=True)`).
A 14B run then holds one full copy of each network in CPU memory on its node's rank 0 instead of one per rank.

`rank0_weights()` is the switch `fit` turns on around `instantiate(cfg.stage)` for FSDP2 runs (the strategy's
`meta_init`, true by default); the loaders (`load_transformer`, `build_student`, `load_student`) ask
`skip_weights()`. The rank comes from the launcher's environment (RANK, else LOCAL_RANK with NODE_RANK 0, else
SLURM_PROCID), read before any process group exists: a process whose rank is unknown, or 0, loads the weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_ENABLED = False


def env_rank() -> int | None:
    """This process's global rank as the launcher's environment states it, None when it does not."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if os.environ.get("LOCAL_RANK", "").isdigit() and os.environ.get("NODE_RANK", "0") in ("", "0"):
        return int(os.environ["LOCAL_RANK"])  # Lightning's own launcher on one node (or node 0)
    return None


@contextlib.contextmanager
def rank0_weights(enabled: bool = True) -> Iterator[None]:
    """Within it, the loaders build networks on the meta device on every rank but global rank 0."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


def skip_weights() -> bool:
    """Whether a loader should build its network on the meta device instead of reading weights (see module doc)."""
    rank = env_rank()
    return _ENABLED and rank is not None and rank > 0

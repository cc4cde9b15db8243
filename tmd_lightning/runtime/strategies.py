"""`FSDP2Strategy`: Lightning's `ModelParallelStrategy` set up for pure FSDP2 data parallelism (docs/method.md §9).

Lightning's `FSDPStrategy` (FSDP1) cannot run manual optimisation with several optimizers and is not used. Its
`ModelParallelStrategy` leaves the parallelism to the LightningModule's `configure_model` (our stages call
`fully_shard` per Wan block there, see `runtime/parallel.py`) and saves distributed (DCP) checkpoints. Two of its
defaults do not fit data parallelism and are changed here:

- the device mesh: Lightning's "auto" means data-parallel size = number of nodes and tensor-parallel size = devices
  per node, so the ranks of one node would all read the *same* batches (tensor parallelism). Here every rank of
  every node is one data-parallel shard (`data_parallel_size = world size`, `tensor_parallel_size = 1`);
- resuming: Lightning asks the DCP folder for every key of the whole LightningModule, but our checkpoints leave out
  the frozen networks (teacher, codec, text encoder: they load from their own folders). Here keys the checkpoint
  does not hold are skipped when they are frozen and are an error when they are trainable.

It runs on CPU with gloo (`trainer.accelerator=cpu`), which is how the tests exercise it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy

CHECKPOINT_MODEL_KEY = "state_dict"  # how Lightning's ModelParallelStrategy names the model state in a DCP folder


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A DCP checkpoint folder as `ModelParallelStrategy` writes it (shards + `.metadata` + Lightning's `meta.pt`)."""
    path = Path(path)
    return path.is_dir() and (path / _METADATA_FILENAME).is_file() and (path / ".metadata").is_file()


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks of all nodes, with DCP checkpoints that may leave frozen networks out.

    Args:
        data_parallel_size: ranks that shard the model; "auto" = all of them (`devices x num_nodes`).
        tensor_parallel_size: kept at 1 (no tensor parallelism is applied by the stages).
        save_distributed_checkpoint: True writes a DCP folder (each rank its shards, no gathering); False gathers
            the full weights and optimizer states on rank 0 into one `.ckpt` file (slow and memory-hungry at 14B).
        process_group_backend: None picks nccl on GPU, gloo on CPU.
        param_dtype: under `bf16-mixed`, the dtype FSDP2 gathers trainable weights in (`MixedPrecisionPolicy`:
            float32 sharded master weights, bf16 all-gathers, float32 gradient reduction; runtime/parallel.py);
            None keeps float32 gathers cast by autocast (a bf16 copy of every gathered block until the step ends).
        meta_init: `fit` builds the networks on the meta device on every rank but global rank 0, which alone reads
            the weights; the shards are filled from rank 0 after sharding (`models/rank0.py`). False: every rank
            loads the full weights.
    """

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, param_dtype: str | None = "bfloat16",
                 meta_init: bool = True) -> None:
        if tensor_parallel_size != 1:
            raise ValueError("FSDP2Strategy shards data-parallel only; tensor_parallel_size must be 1 (the stages "
                             f"apply no tensor parallelism), got {tensor_parallel_size}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if param_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"param_dtype must be bfloat16, float16, float32 or null, got {param_dtype!r}")
        self.param_dtype = param_dtype
        self.meta_init = meta_init

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every rank is a data-parallel shard, not only one per node
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a DCP folder into the sharded model and optimizers; other checkpoints as Lightning does."""
        path = Path(self.broadcast(checkpoint_path))
        from tmd_lightning.checkpoints import safe_loading  # here: checkpoints imports this module

        if weights_only is None:  # Lightning drops `fit(weights_only=...)` on this path (restore after setup)
            weights_only = True
        with safe_loading():  # the safe loader with our checkpoints' allow-list (optimizer partials, ...)
            if not is_distributed_checkpoint(path):
                return super().load_checkpoint(path, weights_only=weights_only)
            return load_distributed_checkpoint(path, self.model, self.optimizers, weights_only)


def load_distributed_checkpoint(path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                                weights_only: bool | None = None) -> dict[str, Any]:
    """Model and optimizer states from a DCP folder (in place, every rank its shards); returns the metadata.

    Model keys missing from the folder are skipped when their parameter is frozen (or they are buffers) and
    raise when a trainable parameter is missing, so a checkpoint of another stage cannot half-load silently.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = get_model_state_dict(model)
    present = {k: v for k, v in state.items() if f"{CHECKPOINT_MODEL_KEY}.{k}" in saved}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in state.keys() - present.keys() if k in trainable)
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} trainable parameter(s) of {type(model).__name__}, e.g. "
                       f"{missing[:5]}: it was written by another stage or network")
    dcp.load({CHECKPOINT_MODEL_KEY: present}, checkpoint_id=path)
    set_model_state_dict(model, present, options=StateDictOptions(strict=False))
    for idx, optimizer in enumerate(optimizers):
        key = f"optimizer_{idx}"
        optim_state = {key: get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

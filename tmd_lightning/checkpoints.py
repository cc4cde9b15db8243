"""Checkpoints and exported folders: reading them safely, and rebuilding a network with its sampler from them.

A checkpoint (a `.ckpt` file, or the DCP folder an FSDP2 run writes) records under `tmd_lightning` its network's class
name and config, the attribute the network lives under, and its sampler (`Sampler.to_record`: a kind and options); an
exported diffusers folder records its sampler in `sampling.json`. Nothing a file names is imported or called beyond a
closed set: network names resolve only through `NETWORK_CLASSES`, sampler kinds only through `sampling`'s kinds, and
checkpoints unpickle with torch's `weights_only` loader, which builds only tensors, plain containers and the
allow-listed `checkpoint_globals`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import json
import os
import typing
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from tmd_lightning.models.folders import require_safetensors
from tmd_lightning.models.lora import load_merged_state
from tmd_lightning.models.tmd import TMDTransformer
from tmd_lightning.runtime.strategies import CHECKPOINT_MODEL_KEY, is_distributed_checkpoint
from tmd_lightning.sampling import Sampler, TeacherSampler, TMDSampler, sampler_from_record
from tmd_lightning.stages.sampling_stage import SamplingStage

NETWORK_CLASSES = {"WanTransformer3DModel": WanTransformer3DModel, "TMDTransformer": TMDTransformer}
SAMPLING_RECORD = "sampling.json"  # next to an exported network: its sampler's record (kind and options)
SAFE_GLOBALS_ENV = "TMD_SAFE_GLOBALS"  # comma-separated dotted names the user trusts checkpoints to hold


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, not a checkpoint, or holding objects the safe loader
    refuses."""


def network_class(name: str, source: Any) -> type[nn.Module]:
    """The network class a record names, from `NETWORK_CLASSES` only."""
    if name not in NETWORK_CLASSES:
        raise ValueError(f"{source}: names network class {name!r}, which is not one of {sorted(NETWORK_CLASSES)}")
    return NETWORK_CLASSES[name]


def network_from_record(meta: dict[str, Any], source: Any = "checkpoint") -> nn.Module:
    """A freshly built network from a checkpoint's architecture record (weights are loaded by the caller)."""
    config = {k: v for k, v in meta["network_config"].items() if not k.startswith("_")}
    return network_class(meta["network_class"], source).from_config(config)


def _hydra_partial_type() -> type:
    """The class Hydra builds for `_partial_: true` (a `functools.partial` subclass in some Hydra versions)."""
    from hydra.utils import instantiate

    try:
        return type(instantiate({"_target_": "builtins.int", "_partial_": True}))
    except Exception:  # a Hydra that refuses the probe: plain partials are allowed anyway
        return functools.partial


def _trusted_by_user() -> list[Any]:
    """The objects $TMD_SAFE_GLOBALS names (`module.Name`, comma-separated): classes the user trusts checkpoints to
    hold, e.g. a custom optimizer in a stage's hyperparameters."""
    trusted = []
    for name in [n.strip() for n in os.environ.get(SAFE_GLOBALS_ENV, "").split(",") if n.strip()]:
        module, _, attr = name.rpartition(".")
        try:
            trusted.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"{SAFE_GLOBALS_ENV}: cannot import {name!r} ({exc}); give module.Name entries") from exc
    return trusted


def checkpoint_globals(extra: Iterable[Any] = ()) -> list[Any]:
    """The allow-list for torch's `weights_only` unpickler: what our checkpoints hold besides tensors and plain
    containers (the stages' hyperparameters: Hydra / functools partials of torch's optimizers and schedulers and of
    `tmd_lightning.optim`, OmegaConf containers), plus `extra` (a run's own config targets) and $TMD_SAFE_GLOBALS."""
    import omegaconf
    from omegaconf import base, nodes

    from tmd_lightning import optim

    def classes(module: Any, base_cls: type) -> list[type]:
        return [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, base_cls)]

    omegaconf_types = [omegaconf.DictConfig, omegaconf.ListConfig, base.Metadata, base.ContainerMetadata,
                       nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode,
                       nodes.BytesNode, nodes.PathNode]
    own = [f for f in vars(optim).values() if callable(f) and getattr(f, "__module__", "") == optim.__name__]
    plain = [dict, list, tuple, set, int, float, str, bool, typing.Any, collections.defaultdict,
             collections.OrderedDict, functools.partial, _hydra_partial_type()]
    return [*plain, *omegaconf_types, *classes(torch.optim, torch.optim.Optimizer),
            *classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler), *own, *extra,
            *_trusted_by_user()]


@contextlib.contextmanager
def safe_loading(extra: Iterable[Any] = ()) -> Iterator[None]:
    """Within it, `torch.load(weights_only=True)` (and Lightning's loads) accept `checkpoint_globals(extra)`."""
    with torch.serialization.safe_globals(checkpoint_globals(extra)):
        yield


def _check_globals(pickle_file: Path, shown: str, extra: Iterable[Any]) -> None:
    """A one-line error when a checkpoint holds objects outside the allow-list (before torch refuses them in a
    many-line message): the names, and how to allow them if the file is trusted."""
    with safe_loading(extra):
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(pickle_file))
    if unsafe:
        raise CheckpointError(f"{shown}: holds {unsafe}, which the safe loader (torch weights_only) does not "
                              f"unpickle; only if you trust this file, allow them with {SAFE_GLOBALS_ENV}="
                              f"{','.join(unsafe)}")


def check_checkpoint(path: str | Path, setting: str = "checkpoint", extra_globals: Iterable[Any] = ()) -> Path:
    """`path` with every link resolved (a `latest` link is followed now, before anything moves it), after a cheap
    check that it is a whole checkpoint that the safe loader reads (`checkpoint_globals(extra_globals)`): a one-line
    error naming `setting` and the path otherwise.

    A `.ckpt` file is a zip archive whose directory sits at its end, so a truncated copy has none; a distributed
    (DCP) folder needs its metadata files. Only the pickle's opcodes are read, not the tensors.
    """
    resolved = Path(path).expanduser().resolve()
    shown = f"{setting}={path}" + (f" ({resolved})" if str(resolved) != str(path) else "")
    if is_distributed_checkpoint(resolved):
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        if not zipfile.is_zipfile(resolved / _METADATA_FILENAME):
            raise CheckpointError(f"{shown}: {_METADATA_FILENAME} is truncated or corrupt; use another checkpoint")
        _check_globals(resolved / _METADATA_FILENAME, shown, extra_globals)
        return resolved
    if not resolved.is_file():
        raise FileNotFoundError(f"{shown}: no checkpoint there (neither a .ckpt file nor a distributed checkpoint "
                                "folder); check the path, or list the run's checkpoints/ folder")
    if not zipfile.is_zipfile(resolved):
        raise CheckpointError(f"{shown}: the file is truncated or not a checkpoint (an interrupted save or copy?); "
                              "use another one, e.g. an earlier step*.ckpt of the same run")
    _check_globals(resolved, shown, extra_globals)
    return resolved


def read_checkpoint(path: str | Path, setting: str = "checkpoint") -> dict[str, Any]:
    """A Lightning checkpoint as one dict, whether a `.ckpt` file (memory-mapped) or a distributed (DCP) folder.

    A DCP folder (`trainer=fsdp`) is consolidated in this process: Lightning's `meta.pt` (hyperparameters, loops,
    callbacks, our records) plus the full model `state_dict`; optimizer states are not read. That holds the whole
    trained network in CPU memory once (the `.ckpt` route maps the file instead).
    """
    path = check_checkpoint(path, setting)
    if is_distributed_checkpoint(path):
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        with safe_loading():
            ckpt = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
        state: dict[str, Any] = {}
        # what torch's `format_utils.dcp_to_torch_save` does (in this process only), without the optimizer states
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys={CHECKPOINT_MODEL_KEY}), no_dist=True)
        return ckpt | {"state_dict": state[CHECKPOINT_MODEL_KEY]}
    with safe_loading():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_record(ckpt: dict[str, Any], source: Any) -> dict[str, Any]:
    """The `tmd_lightning` record every stage writes into its checkpoints (network class, config, attribute,
    sampler); a one-line error for a checkpoint without it."""
    meta = ckpt.get("tmd_lightning")
    if not isinstance(meta, dict) or not {"network_attr", "network_class", "network_config", "sampler"} <= set(meta):
        raise CheckpointError(f"{source}: not a tmd_lightning stage checkpoint (no network and sampler record); "
                              "sample a diffusers folder instead, or a checkpoint a tmd_lightning stage wrote")
    return meta


def network_state(ckpt: dict[str, Any], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights in a checkpoint's `state_dict` (under its attribute's prefix), without the prefix."""
    prefix = meta["network_attr"] + "."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def load_checkpoint_stage(path: str | Path, codec: nn.Module, text_encoder: nn.Module) -> SamplingStage:
    """The network a checkpoint trained (its raw weights; a LoRA student merged) with the sampler it recorded: the
    network alone, without teacher, critics or optimizer state."""
    ckpt = read_checkpoint(path)
    meta = checkpoint_record(ckpt, path)
    sampler, network = sampler_from_record(meta["sampler"], path), network_from_record(meta, path)
    load_merged_state(network, network_state(ckpt, meta), meta.get("lora"))
    negative_prompt = (ckpt.get("hyper_parameters") or {}).get("negative_prompt", "")
    return SamplingStage(network, codec, text_encoder, sampler, negative_prompt)


def pretrained_class(folder: str | Path) -> tuple[str, Path]:
    """(`_class_name`, model folder) of a diffusers folder, looking in `transformer/` too (a pipeline layout)."""
    folder = Path(folder)
    for candidate in (folder, folder / "transformer"):
        if (candidate / "config.json").is_file():
            return json.loads((candidate / "config.json").read_text()).get("_class_name", ""), candidate
    raise FileNotFoundError(f"no config.json in {folder} or {folder / 'transformer'}: not a diffusers model folder")


DEFAULT_SAMPLERS = {"WanTransformer3DModel": TeacherSampler, "TMDTransformer": TMDSampler}  # folders without a record


def folder_sampler(model_dir: Path, class_name: str) -> Sampler:
    """The sampler an exported folder recorded in `sampling.json`, else its network class's default (a Wan folder
    from elsewhere is a teacher)."""
    record = model_dir / SAMPLING_RECORD
    if record.is_file():
        data = json.loads(record.read_text())
        if "sampler" not in data:
            raise ValueError(f"{record}: no sampler record (written by an older tmd_lightning?); re-export the "
                             "checkpoint with `python -m tmd_lightning.export`")
        return sampler_from_record(data["sampler"], record)
    return DEFAULT_SAMPLERS[class_name]()


def load_pretrained_stage(folder: str | Path, codec: nn.Module, text_encoder: nn.Module,
                          negative_prompt: str = "") -> SamplingStage:
    """A diffusers folder (a Wan teacher, a TMD student, a distilled Wan student) with its sampler."""
    class_name, model_dir = pretrained_class(folder)
    require_safetensors(model_dir)
    network = network_class(class_name, model_dir).from_pretrained(str(model_dir), local_files_only=True,
                                                                   use_safetensors=True)
    return SamplingStage(network, codec, text_encoder, folder_sampler(model_dir, class_name), negative_prompt)


def write_sampling_record(folder: str | Path, sampler: Sampler) -> None:
    """`sampling.json` beside an exported network: how `sample` runs it."""
    (Path(folder) / SAMPLING_RECORD).write_text(json.dumps({"sampler": sampler.to_record()}, indent=2))


def load_student(checkpoint: str | Path) -> nn.Module:
    """The student of a stage checkpoint (Stage 1 for `experiment=distill`), with a clear error when it is missing."""
    path = Path(checkpoint)
    if not path.is_file() and not is_distributed_checkpoint(path):
        raise FileNotFoundError(f"no student checkpoint at {path}: run `python -m tmd_lightning.fit "
                                "experiment=adapt_head` first, or set stage.student.checkpoint=PATH")
    ckpt = read_checkpoint(path, "stage.student.checkpoint")
    meta = checkpoint_record(ckpt, path)
    if meta["network_attr"] != "student":
        raise ValueError(f"{path} is not a student checkpoint (adapt_head or distill)")
    from tmd_lightning.models.rank0 import skip_weights

    if skip_weights():  # FSDP2, rank > 0: shapes only; shard_stage fills the shards from rank 0
        with torch.device("meta"):
            return network_from_record(meta, path)
    student = network_from_record(meta, path)
    load_merged_state(student, network_state(ckpt, meta), meta.get("lora"))  # a LoRA student: merged
    return student


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None, use_ema: bool = True) -> Path:
    """Saves the trained network of a stage checkpoint (EMA weights if it holds any and `use_ema`; a LoRA student
    merged) as a diffusers folder with its sampler's record: what a run that finishes exports by itself."""
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    meta = checkpoint_record(ckpt, checkpoint)
    network, state = network_from_record(meta, checkpoint), network_state(ckpt, meta)
    ema = next((s for name, s in ckpt.get("callbacks", {}).items() if name.startswith("EMA")), None)
    if use_ema and ema is not None:
        state.update(ema["shadow"])
    load_merged_state(network, state, meta.get("lora"))
    default = checkpoint.parent.parent / "export" / f"{meta['network_attr']}_step{ckpt['global_step']}"
    out = Path(out) if out else default
    network.save_pretrained(str(out))
    write_sampling_record(out, sampler_from_record(meta["sampler"], checkpoint))
    print(f"exported step {ckpt['global_step']} ({'EMA' if use_ema and ema else 'raw'} weights) to {out}")
    return out

"""Rebuilding a stage for sampling from whatever a run left: a Lightning checkpoint (a `.ckpt` file, or the DCP folder
an FSDP2 run writes) or a diffusers folder.

Nothing a file names is imported or called beyond a closed set: class records (a checkpoint's stage and network, an
export's `sampling.json`) resolve only to this package's stages and networks, and checkpoints unpickle with torch's
`weights_only` loader, which builds only tensors, plain containers and the allow-listed `checkpoint_globals`.
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
from tmd_lightning.stages.base import SAMPLING_RECORD, VideoStage
from tmd_lightning.stages.student import StudentStage
from tmd_lightning.stages.teacher import TeacherStage
from tmd_lightning.strategies import CHECKPOINT_MODEL_KEY, is_distributed_checkpoint

NETWORK_CLASSES = {"WanTransformer3DModel": WanTransformer3DModel, "TMDTransformer": TMDTransformer}
SAFE_GLOBALS_ENV = "TMD_SAFE_GLOBALS"  # comma-separated dotted names the user trusts checkpoints to hold


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, not a checkpoint, or holding objects the safe loader
    refuses."""


def network_class(name: str, source: Any) -> type[nn.Module]:
    """The network class a record names, from `NETWORK_CLASSES` only."""
    if name not in NETWORK_CLASSES:
        raise ValueError(f"{source}: names network class {name!r}, which is not one of {sorted(NETWORK_CLASSES)}")
    return NETWORK_CLASSES[name]


def stage_class(name: str, source: Any) -> type[VideoStage]:
    """The stage class a record names (`module.Class`), from this package's stages only: never an import of what a
    file names. Every stage is imported with `tmd_lightning.stages`."""
    stages, todo = {}, [VideoStage]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("tmd_lightning."):
            stages[f"{cls.__module__}.{cls.__qualname__}"] = cls
    if name not in stages:
        raise ValueError(f"{source}: names stage class {name!r}, which is not one of tmd_lightning's stages "
                         f"{sorted(stages)}")
    return stages[name]


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


def load_checkpoint_stage(path: str | Path, codec: nn.Module, text_encoder: nn.Module,
                          teacher_config: dict[str, Any] | None = None) -> VideoStage:
    """The stage a `.ckpt` was saved from, with its network rebuilt from the architecture stored in it.

    Checkpoints written before that record existed are teacher checkpoints; `teacher_config` gives their shape.
    """
    ckpt = read_checkpoint(path)
    meta = ckpt.get("tmd_lightning")
    if meta is None:
        if teacher_config is None:
            raise ValueError(f"{path} records no architecture; pass the teacher's transformer_config")
        meta = {"stage": "tmd_lightning.stages.teacher.TeacherStage", "network_attr": "transformer",
                "network_class": "WanTransformer3DModel", "network_config": dict(teacher_config)}
    network = network_from_record(meta, path)
    if meta.get("sampling_stage"):  # a distillation checkpoint: the student alone, without teacher and critics
        prefix = meta["network_attr"] + "."
        load_merged_state(network, {k[len(prefix):]: v for k, v in ckpt["state_dict"].items()
                                    if k.startswith(prefix)}, meta.get("lora"))  # a LoRA student: merged
        return _sampling_stage(meta, network, codec, text_encoder, ckpt["hyper_parameters"].get("negative_prompt", ""),
                               path)
    stage_cls = stage_class(meta["stage"], path)
    if is_distributed_checkpoint(path):  # Lightning's load_from_checkpoint reads files only
        stage = stage_cls(**(dict(ckpt["hyper_parameters"]) | {"codec": codec, "text_encoder": text_encoder,
                                                                meta["network_attr"]: network}))
        stage.on_load_checkpoint(ckpt)
        stage.load_state_dict(ckpt["state_dict"], strict=False)
        return stage
    with safe_loading():
        return stage_cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, codec=codec,
                                              text_encoder=text_encoder, **{meta["network_attr"]: network})


def _sampling_stage(record: dict[str, Any], network: nn.Module, codec: nn.Module, text_encoder: nn.Module,
                    negative_prompt: str, source: Any) -> VideoStage:
    defaults = dict(record["sampler_defaults"])
    defaults["grid_gamma"] = defaults.pop("gamma")
    return stage_class(record["sampling_stage"], source)(network, codec, text_encoder, negative_prompt, **defaults)


def pretrained_class(folder: str | Path) -> tuple[str, Path]:
    """(`_class_name`, model folder) of a diffusers folder, looking in `transformer/` too (a pipeline layout)."""
    folder = Path(folder)
    for candidate in (folder, folder / "transformer"):
        if (candidate / "config.json").is_file():
            return json.loads((candidate / "config.json").read_text()).get("_class_name", ""), candidate
    raise FileNotFoundError(f"no config.json in {folder} or {folder / 'transformer'}: not a diffusers model folder")


def load_pretrained_stage(folder: str | Path, codec: nn.Module, text_encoder: nn.Module,
                          negative_prompt: str = "", **student_defaults: Any) -> VideoStage:
    """A sampling-only stage around a diffusers folder: a TMD student (`StudentStage`) or a Wan teacher."""
    class_name, model_dir = pretrained_class(folder)
    require_safetensors(model_dir)
    record = model_dir / SAMPLING_RECORD
    if record.is_file():  # an exported distilled student
        network = network_class(class_name, model_dir).from_pretrained(str(model_dir), local_files_only=True,
                                                                       use_safetensors=True)
        return _sampling_stage(json.loads(record.read_text()), network, codec, text_encoder, negative_prompt, record)
    if class_name == "TMDTransformer":
        student = TMDTransformer.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
        return StudentStage(student, codec, text_encoder, negative_prompt, **student_defaults)
    if class_name != "WanTransformer3DModel":
        raise ValueError(f"{model_dir} holds a {class_name!r}; expected WanTransformer3DModel or TMDTransformer")
    transformer = WanTransformer3DModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
    return TeacherStage(transformer, codec, text_encoder, optimizer=None, negative_prompt=negative_prompt)


def load_student(checkpoint: str | Path) -> nn.Module:
    """The student of a stage checkpoint (Stage 1 for `experiment=distill`), with a clear error when it is missing."""
    path = Path(checkpoint)
    if not path.is_file() and not is_distributed_checkpoint(path):
        raise FileNotFoundError(f"no student checkpoint at {path}: run `python -m tmd_lightning.fit "
                                "experiment=adapt_head` first, or set stage.student.checkpoint=PATH")
    ckpt = read_checkpoint(path, "stage.student.checkpoint")
    meta = ckpt.get("tmd_lightning")
    if meta is None or meta["network_attr"] != "student":
        raise ValueError(f"{path} is not a student checkpoint (adapt_head or distill)")
    from tmd_lightning.models.rank0 import skip_weights

    if skip_weights():  # FSDP2, rank > 0: shapes only; shard_stage fills the shards from rank 0
        with torch.device("meta"):
            return network_from_record(meta, path)
    student = network_from_record(meta, path)
    load_merged_state(student, {k[len("student."):]: v for k, v in ckpt["state_dict"].items()
                                if k.startswith("student.")}, meta.get("lora"))  # a LoRA student: merged
    return student

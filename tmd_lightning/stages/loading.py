"""Rebuilding a stage for sampling from whatever a run left: a Lightning checkpoint (a `.ckpt` file, or the DCP folder
an FSDP2 run writes) or a diffusers folder."""

from __future__ import annotations

import importlib
import json
import zipfile
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


def network_from_record(meta: dict[str, Any]) -> nn.Module:
    """A freshly built network from a checkpoint's architecture record (weights are loaded by the caller)."""
    config = {k: v for k, v in meta["network_config"].items() if not k.startswith("_")}
    return NETWORK_CLASSES[meta["network_class"]].from_config(config)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, or not a checkpoint at all."""


def check_checkpoint(path: str | Path, setting: str = "checkpoint") -> Path:
    """`path` with every link resolved (a `latest` link is followed now, before anything moves it), after a cheap
    check that it is a whole checkpoint: a one-line error naming `setting` and the path otherwise.

    A `.ckpt` file is a zip archive whose directory sits at its end, so a truncated copy has none; a distributed
    (DCP) folder needs its metadata files.
    """
    resolved = Path(path).expanduser().resolve()
    shown = f"{setting}={path}" + (f" ({resolved})" if str(resolved) != str(path) else "")
    if is_distributed_checkpoint(resolved):
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        if not zipfile.is_zipfile(resolved / _METADATA_FILENAME):
            raise CheckpointError(f"{shown}: {_METADATA_FILENAME} is truncated or corrupt; use another checkpoint")
        return resolved
    if not resolved.is_file():
        raise FileNotFoundError(f"{shown}: no checkpoint there (neither a .ckpt file nor a distributed checkpoint "
                                "folder); check the path, or list the run's checkpoints/ folder")
    if not zipfile.is_zipfile(resolved):
        raise CheckpointError(f"{shown}: the file is truncated or not a checkpoint (an interrupted save or copy?); "
                              "use another one, e.g. an earlier step*.ckpt of the same run")
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

        ckpt = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
        state: dict[str, Any] = {}
        # what torch's `format_utils.dcp_to_torch_save` does (in this process only), without the optimizer states
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys={CHECKPOINT_MODEL_KEY}), no_dist=True)
        return ckpt | {"state_dict": state[CHECKPOINT_MODEL_KEY]}
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


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
    network = network_from_record(meta)
    if meta.get("sampling_stage"):  # a distillation checkpoint: the student alone, without teacher and critics
        prefix = meta["network_attr"] + "."
        load_merged_state(network, {k[len(prefix):]: v for k, v in ckpt["state_dict"].items()
                                    if k.startswith(prefix)}, meta.get("lora"))  # a LoRA student: merged
        return _sampling_stage(meta, network, codec, text_encoder, ckpt["hyper_parameters"].get("negative_prompt", ""))
    stage_cls = _import(meta["stage"])
    if is_distributed_checkpoint(path):  # Lightning's load_from_checkpoint reads files only
        stage = stage_cls(**(dict(ckpt["hyper_parameters"]) | {"codec": codec, "text_encoder": text_encoder,
                                                                meta["network_attr"]: network}))
        stage.on_load_checkpoint(ckpt)
        stage.load_state_dict(ckpt["state_dict"], strict=False)
        return stage
    return stage_cls.load_from_checkpoint(path, map_location="cpu", weights_only=False, codec=codec,
                                          text_encoder=text_encoder, **{meta["network_attr"]: network})


def _sampling_stage(record: dict[str, Any], network: nn.Module, codec: nn.Module, text_encoder: nn.Module,
                    negative_prompt: str) -> VideoStage:
    defaults = dict(record["sampler_defaults"])
    defaults["grid_gamma"] = defaults.pop("gamma")
    return _import(record["sampling_stage"])(network, codec, text_encoder, negative_prompt, **defaults)


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
        network = NETWORK_CLASSES[class_name].from_pretrained(str(model_dir), local_files_only=True,
                                                              use_safetensors=True)
        return _sampling_stage(json.loads(record.read_text()), network, codec, text_encoder, negative_prompt)
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
    student = network_from_record(meta)
    load_merged_state(student, {k[len("student."):]: v for k, v in ckpt["state_dict"].items()
                                if k.startswith("student.")}, meta.get("lora"))  # a LoRA student: merged
    return student

"""Building and loading the Wan teacher (`diffusers.WanTransformer3DModel`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.models.folders import local_folder, require_safetensors
from tmd_lightning.models.precision import cast_model
from tmd_lightning.models.rank0 import skip_weights

PACKAGE_ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOY_MODEL_DIR = PACKAGE_ASSETS / "toy_wan"


def load_transformer(
    pretrained: str | Path | None = None,
    config: dict[str, Any] | None = None,
    subfolder: str | None = "transformer",
    dtype: torch.dtype | str = torch.float32,
) -> WanTransformer3DModel:
    """A Wan transformer from a local diffusers folder (`pretrained`, its `subfolder` if present; safetensors weights
    only, never a hub lookup) or, for training from scratch, a config."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if pretrained is not None:
        path = local_folder(pretrained, "pretrained")
        folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        if skip_weights():  # FSDP2, rank > 0: shapes only; shard_stage fills the shards from rank 0
            with torch.device("meta"):
                model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(str(folder)))
            return cast_model(model, dtype) if dtype != torch.float32 else model
        folder = require_safetensors(folder)
        return WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
    if config is None:
        raise ValueError("give model.pretrained (a diffusers folder) or a transformer config")
    if not isinstance(config, dict):  # a Hydra DictConfig: plain containers, so save_pretrained can write JSON
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    model = WanTransformer3DModel(**config)
    return model if dtype == torch.float32 else cast_model(model, dtype)  # as from_pretrained(torch_dtype=dtype)

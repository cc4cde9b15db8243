"""Local model folders (diffusers / transformers layout), checked before anything loads from them.

Models load only from local folders: a path that does not exist is an error, never a Hugging Face hub lookup. Weights
load only from safetensors files: a `.bin` weight file is a pickle, which can run code when read, so a folder that
holds nothing else is an error naming the safetensors file it lacks rather than a silent fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def local_folder(path: str | Path, setting: str = "model.pretrained") -> Path:
    """`path` as an existing local folder; `setting` names the option to fix in the error."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{setting}={path}: no such folder; set it to a local diffusers model folder "
                                "(nothing is downloaded: fetch it first, e.g. with `huggingface-cli download`)")
    return folder


def require_safetensors(folder: Path, weights: str = DIFFUSERS_WEIGHTS) -> Path:
    """`folder` after checking that it holds its safetensors weights: `weights`, or its `.index.json` and every shard
    the index lists. The error names the missing file."""
    index = folder / f"{weights}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing weight shard(s) {missing} listed in {index.name}; the "
                                    "download or export is incomplete, fetch the folder again")
        return folder
    if not (folder / weights).is_file():
        pickled = [p.name for p in folder.glob("*.bin")]
        found = f" (found {pickled}: pickled weights are not loaded, convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{folder}: no {weights}{found}; the download or export is incomplete, fetch the "
                                "folder again")
    return folder

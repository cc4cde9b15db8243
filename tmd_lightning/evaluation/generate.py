"""Sampling fixed prompts x seeds through a stage: which prompts, which model, on which device and in which dtype, and
the timed, gradient-free generation that `sample`, `evaluate`, `generate`, `precompute`, `kd_pairs` and the toy study
share.

Checkpoint loading (`tmd_lightning.checkpoints`) is imported where it is used: the sampling callbacks import this
package's scores, and the stages import the callbacks, so a module-level import here would be circular.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.models.precision import cast_model, resolve_dtype

if TYPE_CHECKING:
    from tmd_lightning.stages.base import VideoStage


def resolve_prompts(prompts: Any, caption_column: str = "caption") -> list[str]:
    """"toy" -> the 48 toy captions; a path -> one prompt per non-empty line, or, for a `.csv` file, the non-empty
    values of its `caption_column` (a manifest's captions); a list -> itself. No prompt at all is an error: there
    would be nothing to sample or score."""
    if isinstance(prompts, str):
        if prompts == "toy":
            return all_captions()
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path} (use prompts=toy or a list)")
        lines = _csv_captions(path, caption_column) if path.suffix.lower() == ".csv" else \
            [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompts={path}: the file holds no prompts; write one prompt per line, or use "
                             "prompts=toy or prompts=[...]")
        return lines
    out = [str(p) for p in prompts]
    if not out or any(not p.strip() for p in out):
        raise ValueError("prompts must be non-empty strings")
    return out


def _csv_captions(path: Path, column: str) -> list[str]:
    """The non-empty values of `column` in a CSV file (a manifest's captions)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"prompts={path}: no column {column!r} in its header {reader.fieldnames} (set the "
                             "caption column)")
        return [row[column].strip() for row in reader if (row[column] or "").strip()]


def load_model(path: str | Path, codec: torch.nn.Module, text_encoder: torch.nn.Module,
               negative_prompt: str = "") -> VideoStage:
    """Any model `sample` takes, with its sampler: a stage `.ckpt` or a diffusers folder (teacher, TMD student,
    distilled student)."""
    from tmd_lightning.checkpoints import load_checkpoint_stage, load_pretrained_stage

    if str(path).endswith(".ckpt"):
        return load_checkpoint_stage(path, codec, text_encoder)
    return load_pretrained_stage(path, codec, text_encoder, negative_prompt)


def load_stage(cfg: DictConfig) -> VideoStage:
    """The network to sample: a stage's Lightning checkpoint (`checkpoint`), a diffusers folder (teacher or TMD
    student), or the model's teacher. A `.ckpt` is checked before the codec and text encoder load, so a missing or
    truncated file fails in a second, not after minutes of loading."""
    from tmd_lightning.checkpoints import check_checkpoint

    source = cfg.get("checkpoint") or cfg.model.pretrained
    if str(source).endswith(".ckpt"):
        check_checkpoint(source, "checkpoint")
    codec, text_encoder = instantiate(cfg.model.codec), instantiate(cfg.model.text_encoder)
    return load_model(source, codec, text_encoder, cfg.model.negative_prompt)


def resolve_device(name: str) -> torch.device:
    """"auto" -> this process's GPU (cuda:LOCAL_RANK under torchrun, else cuda:0) when there is one, else the CPU;
    any other name as given ("cpu", "cuda:1")."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def prepare_stage(stage: VideoStage, device: torch.device, dtype: str | torch.dtype = "auto") -> VideoStage:
    """The stage ready to sample: its network's weights in `dtype` ("auto": bf16 on a GPU, float32 on the CPU),
    diffusers' float32-kept modules (time embedder, norms, modulation tables) left in float32, on `device`, in eval
    mode. The codec and text encoder keep their own dtypes; the samplers cast the model's inputs."""
    cast_model(stage.network, resolve_dtype(dtype, device))
    return stage.to(device).eval()


def allow_tf32(device: torch.device, enabled: bool = True) -> bool:
    """TF32 matmuls and convolutions for sampling on a GPU (`tf32: true` in sample / evaluate); returns whether it
    was switched on. Weights sample in bf16 there by default (`dtype: auto`); the CPU is left as it is."""
    if not enabled or device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def generate_videos(stage: VideoStage, pairs: list[tuple[str, int]], shape: tuple[int, int, int], batch_size: int,
                    **sampler: Any) -> tuple[torch.Tensor, float]:
    """uint8 videos for every (prompt, seed) and the wall-clock seconds per video (under `torch.inference_mode`:
    the entry points sample outside any training)."""
    start = time.perf_counter()
    with torch.inference_mode():
        videos = [stage.generate([p for p, _ in pairs[i : i + batch_size]], [s for _, s in pairs[i : i + batch_size]],
                                 *shape, **sampler).cpu() for i in range(0, len(pairs), batch_size)]
    return torch.cat(videos), (time.perf_counter() - start) / len(pairs)

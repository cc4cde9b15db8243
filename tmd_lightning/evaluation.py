"""Sampling a model on fixed prompts and seeds, and scoring the videos: what `sample`, `evaluate`, `precompute` and
the toy study share (kept out of the entry points, which nothing imports)."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tmd_lightning.checkpoints import load_checkpoint_stage, load_pretrained_stage
from tmd_lightning.data.backends import get_backend
from tmd_lightning.data.manifest import read_manifest
from tmd_lightning.data.toy_world import all_captions, generate_toy_dataset
from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.toy import ToyAccuracy, direction_confusion, toy_features
from tmd_lightning.models.precision import cast_model, resolve_dtype
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
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"prompts={path}: no column {column!r} in its header {reader.fieldnames} (set the "
                             "caption column)")
        return [row[column].strip() for row in reader if (row[column] or "").strip()]


def toy_reference(cfg: DictConfig) -> Path | None:
    """Manifest of the real toy videos toy-FD compares with (written on first use, then reused)."""
    ref = cfg.get("toy_reference")
    if not ref:
        return None
    return generate_toy_dataset(ref.root, ref.videos_per_caption, cfg.num_frames, cfg.height, seed=ref.seed,
                                split="reference")


def toy_report(videos: torch.Tensor, captions: list[str], real_manifest: Path | None) -> dict[str, Any]:
    """Per-attribute and joint toy accuracy, the direction probe (`metrics.toy.direction_confusion`), and toy-FD
    against the real videos of `real_manifest`."""
    acc = ToyAccuracy()
    acc.update(videos, captions)
    report: dict[str, Any] = {f"acc_{k}": float(v) for k, v in acc.compute().items()}
    report["direction_probe"] = direction_confusion(videos, captions)
    if real_manifest is not None:
        backend = get_backend("auto")
        entries = read_manifest(real_manifest)
        real = torch.stack([torch.from_numpy(backend.read(e.path, videos.shape[1])) for e in entries])
        report["toy_fd"] = float(frechet_distance(*gaussian_stats(toy_features(videos)),
                                                  *gaussian_stats(toy_features(real))))
        report["toy_fd_real_count"] = len(entries)
    return report


def load_model(path: str | Path, codec: torch.nn.Module, text_encoder: torch.nn.Module,
               negative_prompt: str = "") -> VideoStage:
    """Any model `sample` takes: a stage `.ckpt` or a diffusers folder (teacher, TMD student, distilled student)."""
    if str(path).endswith(".ckpt"):
        return load_checkpoint_stage(path, codec, text_encoder)
    return load_pretrained_stage(path, codec, text_encoder, negative_prompt)


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


def generate(stage: VideoStage, pairs: list[tuple[str, int]], shape: tuple[int, int, int], batch_size: int,
             **sampler: Any) -> tuple[torch.Tensor, float]:
    """uint8 videos for every (prompt, seed) and the wall-clock seconds per video (under `torch.inference_mode`:
    the entry points sample outside any training)."""
    start = time.perf_counter()
    with torch.inference_mode():
        videos = [stage.generate([p for p, _ in pairs[i : i + batch_size]], [s for _, s in pairs[i : i + batch_size]],
                                 *shape, **sampler).cpu() for i in range(0, len(pairs), batch_size)]
    return torch.cat(videos), (time.perf_counter() - start) / len(pairs)


def sampler_label(opts: dict[str, Any]) -> str:
    if "steps" in opts:
        return f"Euler {opts['steps']} x CFG {opts.get('cfg', 5.0):g}" if opts.get("cfg", 5.0) != 1 else \
            f"Euler {opts['steps']}, no CFG"
    return f"TMD M={opts['M']} N={opts['N']}" if "N" in opts else f"few-step M={opts['M']}"

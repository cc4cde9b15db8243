"""A training set made by a teacher (`python -m tmd_lightning.generate`), as the paper made its own (Wan2.1 14B samples
of 479k prompts).

Item i of the plan is prompt `i // seeds_per_prompt` with seed `seed + i`: its noise depends on that seed alone
(`VideoStage.initial_noise`), so the same item comes out whatever the batch, rank or rerun. The teacher samples it
with its own sampler. Two outputs, both split over ranks by shard (`data/sharding.py`):
- videos and a manifest (`generate_manifest`): `videos/<item>_seed<seed>.mp4` written under a temporary name, then
  renamed (a file that exists is complete), a record `shards/shard_<k>.json` per shard, and `manifest.csv` merged
  by the last rank done;
- a latent cache (`generate_cache`, the layout of `data/cache.py`, written by `cache_writer.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.data.cache import CacheError, signature
from tmd_lightning.data.cache_writer import CacheWriter, ShardContent
from tmd_lightning.data.manifest import write_manifest
from tmd_lightning.data.sharding import ShardJob, atomic_write_text, current_record, finished_records, my_share
from tmd_lightning.data.toy_world import write_mp4
from tmd_lightning.evaluation import load_stage, prepare_stage, resolve_prompts
from tmd_lightning.stages.base import VideoStage

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
RECORD_FILE = "generate.json"  # the configuration a manifest output was made under
FORMATS = ("manifest", "cache")
CACHE_LOG_FORMAT = "wrote {file} ({samples} items, {seconds:.1f} s)"  # one line per cache shard written


# ------------------------------------------------------------------------------------------------ what is planned


def generate_record(cfg: DictConfig) -> dict[str, Any]:
    """The configuration items are made under: stored with the output; shards made under another one are redone, and
    an output folder of another configuration is an error. The cache keys are those `data=cache` checks."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    text_encoder = {k: v for k, v in model["text_encoder"].items() if k != "cache_dir"}
    return {"kind": "generate", "output_format": str(cfg.output_format), "model": model["name"],
            "teacher": str(cfg.get("checkpoint") or cfg.model.pretrained), "codec": model["codec"],
            "text_encoder": text_encoder, "negative_prompt": model["negative_prompt"],
            "num_frames": int(cfg.num_frames), "height": int(cfg.height), "width": int(cfg.width),
            "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "seed": int(cfg.seed),
            "seeds_per_prompt": int(cfg.seeds_per_prompt), "teacher_dtype": str(cfg.teacher_dtype),
            "dtype": str(cfg.dtype), "fps": int(cfg.fps)}


def plan_items(prompts: list[str], seeds_per_prompt: int, seed: int) -> list[tuple[int, str, int]]:
    """(item, prompt, seed) of every video: prompt i // seeds_per_prompt, seed `seed + i`."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    return [(i, prompts[i // seeds_per_prompt], seed + i) for i in range(len(prompts) * seeds_per_prompt)]


def video_name(item: int, seed: int) -> str:
    return f"videos/{item:07d}_seed{seed}.mp4"


# ------------------------------------------------------------------------------------------------ the teacher


class Teacher:
    """The teacher stage (`sample.load_stage`: `checkpoint` or `model.pretrained`), loaded on first use, ready to
    sample on this process's device: a rerun over a finished output loads nothing."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    @cached_property
    def stage(self) -> VideoStage:
        return prepare_stage(load_stage(self.cfg), self.device, self.cfg.teacher_dtype)

    @cached_property
    def sampler(self) -> dict[str, Any]:
        return self.stage.sampler_options(**OmegaConf.to_container(self.cfg.sampler, resolve=True))

    def batches(self, items: list, batch_size: int) -> Iterator[tuple[list, torch.Tensor]]:
        """(items, latents) per batch of `items` (the teacher's samples in the codec's latent space)."""
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            with torch.inference_mode():
                latents = self.stage.generate_latents([p for _, p, _ in chunk], [s for _, _, s in chunk],
                                                      int(self.cfg.num_frames), int(self.cfg.height),
                                                      int(self.cfg.width), **self.sampler)
            yield chunk, latents

    def encode_trimmed(self, captions: list[str]) -> list[torch.Tensor]:
        """The captions' text embeddings through the teacher's text encoder, each trimmed to its real length."""
        return self.stage.text_encoder.encode_trimmed(captions)

    def cache_shard(self, job: ShardJob) -> ShardContent:
        """One cache shard: the teacher's latents of its items and their trimmed text embeddings."""
        dtype = getattr(torch, self.cfg.dtype)
        latents, texts, samples = [], [], []
        for chunk, z in self.batches([tuple(item) for item in job.rows], int(self.cfg.batch_size)):
            trimmed = self.encode_trimmed([p for _, p, _ in chunk])
            for (i, prompt, seed), zi, ti in zip(chunk, z, trimmed, strict=True):
                latents.append(zi.to(dtype).cpu())
                texts.append(ti.to(dtype).cpu())
                samples.append({"caption": prompt, "item": i, "seed": seed, "latent_shape": list(zi.shape),
                                "text_shape": list(ti.shape)})
        return ShardContent(latents, texts, samples)


# ------------------------------------------------------------------------------------------------ manifest output


def read_json_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def manifest_shard_path(out: Path, job: ShardJob) -> Path:
    return out / "shards" / f"shard_{job.shard:05d}.json"


def write_videos(out: Path, jobs: list[ShardJob], teacher: Teacher, cfg: DictConfig, sig: str) -> list[Path]:
    """This process's missing videos among `jobs`, then each shard's record; returns the videos written now."""
    written = []
    for job in jobs:
        path = manifest_shard_path(out, job)
        if current_record(read_json_record, path, sig, job.rows) is not None:
            continue
        todo = [tuple(item) for item in job.rows if not (out / video_name(item[0], item[2])).is_file()]
        start = time.perf_counter()
        for chunk, latents in teacher.batches(todo, int(cfg.batch_size)):
            with torch.inference_mode():
                videos = teacher.stage.codec.decode(latents).cpu().numpy()
            for (i, _, seed), video in zip(chunk, videos, strict=True):
                target = out / video_name(i, seed)
                tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.mp4")
                write_mp4(tmp, video, fps=int(cfg.fps))
                os.replace(tmp, target)
                written.append(target)
        f, h, w = int(cfg.num_frames), int(cfg.height), int(cfg.width)
        samples = [{"path": video_name(i, seed), "caption": prompt, "num_frames": f, "height": h, "width": w,
                    "fps": int(cfg.fps), "seed": seed} for i, prompt, seed in job.rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"signature": sig, "split": job.split, "shard": job.shard,
                                            "rows": job.rows, "samples": samples}))
        log.info("wrote shard %d: %d videos (%d now, %.1f s)", job.shard, len(job.rows), len(todo),
                 time.perf_counter() - start)
    return written


def merge_manifest(out: Path, jobs: list[ShardJob], sig: str) -> Path | None:
    """`manifest.csv` over every shard when all are finished (by any rank), written atomically; else None."""
    records = finished_records(read_json_record, [manifest_shard_path(out, j) for j in jobs], jobs, sig)
    if records is None:
        return None
    tmp = write_manifest(out / f"manifest.{os.getpid()}.tmp.csv", [s for rec in records for s in rec["samples"]])
    os.replace(tmp, out / MANIFEST_FILE)
    return out / MANIFEST_FILE


def check_previous(out: Path, record: dict[str, Any]) -> None:
    """An error when `out` holds items made under another configuration; else the record is stored there."""
    path = out / RECORD_FILE
    previous = read_json_record(path) if path.is_file() else None
    if previous is not None and previous != record:
        problems = [f"{k}: folder has {json.dumps(previous.get(k))}, run has {json.dumps(v)}"
                    for k, v in record.items() if previous.get(k) != v]
        raise CacheError(f"{out} already holds videos made with another configuration:\n  " + "\n  ".join(problems)
                         + "\nChoose another output folder, or delete this one to generate it again.")
    if previous is None:
        atomic_write_text(path, json.dumps(record, indent=1))


# ------------------------------------------------------------------------------------------------ both outputs


def generate_manifest(out: Path, jobs: list[ShardJob], teacher: Teacher, cfg: DictConfig, record: dict[str, Any],
                      rank: int, world_size: int) -> dict[str, Any]:
    """This rank's videos, then, when every shard is done (by any rank), the merged manifest.

    Returns {"written": videos written now, "manifest": the merged manifest's path or None}."""
    sig = signature(record)
    check_previous(out, record)
    written = write_videos(out, my_share(jobs, rank, world_size), teacher, cfg, sig)
    return {"written": written, "manifest": merge_manifest(out, jobs, sig)}  # the last rank done merges


def generate_cache(out: Path, jobs: list[ShardJob], teacher: Teacher, cfg: DictConfig, record: dict[str, Any],
                   rank: int, world_size: int) -> dict[str, Any]:
    """This rank's cache shards, then, when every shard is done, the prompts (the negative prompt and `eval_prompts`)
    and the index.

    Returns {"written": cache shards written now, "index": the cache index or None}."""
    writer = CacheWriter(out, record, rank, world_size)
    written = writer.write_share(jobs, teacher.cache_shard, CACHE_LOG_FORMAT)
    index = writer.merge(jobs, cfg.model.negative_prompt,
                         lambda: resolve_prompts(cfg.eval_prompts) if cfg.eval_prompts else [],
                         teacher.encode_trimmed, getattr(torch, cfg.dtype))
    return {"written": written, "index": index}

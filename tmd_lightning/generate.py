"""Entry point: `python -m tmd_lightning.generate prompts=FILE [model=NAME] [checkpoint=TEACHER] [output=DIR]
[output_format=manifest|cache]` — a training set made by a teacher, as the paper made its own (Wan2.1 14B samples of
479k prompts).

Item i of the plan is prompt `i // seeds_per_prompt` of the prompt file (one prompt per line, or a CSV's
`caption_column`) with seed `seed + i`: its noise depends on that seed alone (`VideoStage.initial_noise`), so the
same item comes out whatever the batch, rank or rerun. The teacher samples it with its own sampler (50 Euler steps,
CFG 5 by default, as `sample`).

Outputs:
- `output_format: manifest` — `videos/<item>_seed<seed>.mp4` (the toy world's H.264 4:4:4 at the sampled size) and
  `manifest.csv` (path, caption, num_frames, height, width, fps, seed) that `data=manifest` reads; per shard a record
  `shards/shard_<k>.json` of its rows. A rerun skips every video already written (MP4s are written under a temporary
  name, then renamed, so a file that exists is complete).
- `output_format: cache` — the latent cache `precompute` writes (`data/cache.py`: shards of the teacher's latents and
  trimmed text embeddings, `prompts.safetensors` with the negative prompt and `eval_prompts`, `index.json`), so
  `data=cache data.cache_dir=DIR` trains from it without decoding or encoding anything; a rerun redoes only missing,
  damaged or outdated shards.

Launched with torchrun or srun, rank r of W takes shards r, r + W, ... and the last rank done writes the one merged
manifest or index (`data/sharding.py`); a rerun with any number of processes completes an unfinished set. A rerun
over a finished set loads no network.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.data.cache import (
    INDEX_FILE,
    CacheError,
    build_index,
    finished_shards,
    previous_index,
    shard_current,
    shard_path,
    signature,
    store_prompts,
    write_index,
    write_shard,
)
from tmd_lightning.data.manifest import write_manifest
from tmd_lightning.data.sharding import (
    ShardJob,
    atomic_write_text,
    current_record,
    finished_records,
    my_share,
    plan_shards,
    process_share,
    report_share,
)
from tmd_lightning.data.toy_world import write_mp4
from tmd_lightning.evaluation import load_stage, prepare_stage, resolve_device, resolve_prompts
from tmd_lightning.quiet import quiet_third_party
from tmd_lightning.stages.base import VideoStage

log = logging.getLogger(__name__)
register_resolvers()

MANIFEST_FILE = "manifest.csv"
RECORD_FILE = "generate.json"  # the configuration a manifest output was made under
FORMATS = ("manifest", "cache")


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
    """The teacher stage (`evaluation.load_stage`: `checkpoint` or `model.pretrained`), loaded on first use, ready to
    sample on this process's device: a rerun over a finished output loads nothing."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    @cached_property
    def stage(self) -> VideoStage:
        return prepare_stage(load_stage(self.cfg), self.device, self.cfg.teacher_dtype)

    @cached_property
    def sampler(self) -> dict[str, Any]:
        return self.stage.sampler_options(**OmegaConf.to_container(self.cfg.sampler, resolve=True))

    def batches(self, items: list, batch_size: int):
        """(items, latents) per batch of `items` (the teacher's samples in the codec's latent space)."""
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            with torch.inference_mode():
                latents = self.stage.generate_latents([p for _, p, _ in chunk], [s for _, _, s in chunk],
                                                      int(self.cfg.num_frames), int(self.cfg.height),
                                                      int(self.cfg.width), **self.sampler)
            yield chunk, latents


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


# ------------------------------------------------------------------------------------------------ cache output


def write_cache_shards(out: Path, jobs: list[ShardJob], teacher: Teacher, cfg: DictConfig, sig: str) -> list[Path]:
    """This process's missing cache shards among `jobs`: the teacher's latents and the trimmed text embeddings."""
    dtype = getattr(torch, cfg.dtype)
    written = []
    for job in jobs:
        if shard_current(out, job, sig) is not None:
            continue
        start = time.perf_counter()
        latents, texts, samples = [], [], []
        for chunk, z in teacher.batches([tuple(item) for item in job.rows], int(cfg.batch_size)):
            trimmed = teacher.stage.text_encoder.encode_trimmed([p for _, p, _ in chunk])
            for (i, prompt, seed), zi, ti in zip(chunk, z, trimmed, strict=True):
                latents.append(zi.to(dtype).cpu())
                texts.append(ti.to(dtype).cpu())
                samples.append({"caption": prompt, "item": i, "seed": seed, "latent_shape": list(zi.shape),
                                "text_shape": list(ti.shape)})
        path = shard_path(out, job.split, job.shard)
        write_shard(path, latents, texts, {"signature": sig, "split": job.split, "shard": job.shard,
                                           "rows": job.rows, "samples": samples, "skipped": []})
        written.append(path)
        log.info("wrote %s (%d items, %.1f s)", path.name, len(samples), time.perf_counter() - start)
    return written


def merge_cache(out: Path, jobs: list[ShardJob], teacher: Teacher, cfg: DictConfig, record: dict[str, Any],
                sig: str, previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cache's prompts and index when every shard is finished (by any rank); else None."""
    records = finished_shards(out, jobs, sig)
    if records is None:
        return None
    extra = resolve_prompts(cfg.eval_prompts) if cfg.eval_prompts else []
    captions = list(dict.fromkeys([cfg.model.negative_prompt, *extra]))
    prompts = store_prompts(out, captions, lambda c: teacher.stage.text_encoder.encode_trimmed(c),
                            getattr(torch, cfg.dtype), cfg.model.negative_prompt,
                            previous and previous.get("prompts"), sig)
    index = build_index(out, jobs, records, record, sig, prompts)
    write_index(out, index)
    return index


# ------------------------------------------------------------------------------------------------ the command


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generates this process's share of the items into `cfg.output`, then, when every shard is done, the merged
    manifest (or cache index).

    Returns {"written": files written now (videos or cache shards), "manifest": the merged manifest's path or None,
    "index": the cache index or None, "output": the folder}.
    """
    if cfg.output_format not in FORMATS:
        raise ValueError(f"output_format={cfg.output_format}: choose one of {FORMATS}")
    rank, world_size = process_share(cfg.rank, cfg.world_size)
    prompts = resolve_prompts(cfg.prompts, cfg.caption_column)  # checked before any model loads
    items = plan_items(prompts, int(cfg.seeds_per_prompt), int(cfg.seed))
    jobs = plan_shards({"train": items}, int(cfg.shard_size))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    record = generate_record(cfg)
    sig = signature(record)
    teacher = Teacher(cfg, resolve_device(cfg.device))
    result: dict[str, Any] = {"manifest": None, "index": None, "output": out}
    if cfg.output_format == "manifest":
        check_previous(out, record)
        result["written"] = write_videos(out, my_share(jobs, rank, world_size), teacher, cfg, sig)
        result["manifest"] = merge_manifest(out, jobs, sig)  # the last rank done merges
        done = result["manifest"]
    else:
        previous = previous_index(out, record)
        result["written"] = write_cache_shards(out, my_share(jobs, rank, world_size), teacher, cfg, sig)
        result["index"] = merge_cache(out, jobs, teacher, cfg, record, sig, previous)
        done = result["index"]
    manifest = cfg.output_format == "manifest"
    if report_share(out / (MANIFEST_FILE if manifest else INDEX_FILE), done is not None, result["written"], rank,
                    world_size, "videos" if manifest else "shards"):
        size = f"data.num_frames={cfg.num_frames} data.height={cfg.height} data.width={cfg.width}"
        source = f"data=manifest data.train_manifest={out / MANIFEST_FILE}" if cfg.output_format == "manifest" \
            else f"data=cache data.cache_dir={out}"
        print(f"{len(items)} items ({len(prompts)} prompts x {cfg.seeds_per_prompt} seeds) in {out}\n"
              f"train:   python -m tmd_lightning.fit experiment=... model={cfg.model.name} {source} {size}")
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    run(cfg)


if __name__ == "__main__":
    main()

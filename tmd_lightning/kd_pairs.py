"""Entry point: `python -m tmd_lightning.kd_pairs [model=NAME] [prompts=FILE] [num_pairs=N] [output=DIR]` — the
teacher's noise -> sample pairs for the KD warm-up of the one-step DMD2-v baseline (the paper's Table 7).

Pair i: noise `eps_i ~ N(0, I)` from a generator seeded with `seed + i` (rounded to the storage dtype, so the stored
noise is exactly what the teacher started from), prompt `i mod P`, and the teacher's sample from `eps_i` with its own
sampler (`TeacherStage.sample_latents`: 50 Euler steps, CFG 5 by default), optionally with skip-layer guidance
(`skip_layers`, our reading of the paper's "skip-layer 10"; see configs/kd_pairs.yaml).

The pairs are a cache in `precompute`'s layout (`data/cache.py`), so `data=cache` serves them: per pair `latents.<j>`
(the teacher's sample), `text.<j>` (the prompt's text embedding, trimmed) and the extra tensor `noise.<j>`; the index
names the prompts, and `prompts.safetensors` holds the negative prompt and every prompt used. Shards are written
atomically; a rerun writes only missing, damaged or outdated shards (and loads no network when none is). Launched
with torchrun (RANK / WORLD_SIZE) or SLURM, rank r of W writes shards r, r + W, r + 2W, ... of the list of all
shards (training, then validation); the rank that finds every shard finished writes `prompts.safetensors` and then
`index.json` (a rerun with any number of processes completes a cache whose index is missing): the split and merge of
`data/sharding.py`, shared with `precompute` and `generate`.
"""

from __future__ import annotations

import itertools
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.data.cache import (
    INDEX_FILE,
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
from tmd_lightning.data.sharding import ShardJob, my_share, plan_shards, process_share, report_share
from tmd_lightning.evaluation import prepare_stage, resolve_device, resolve_prompts
from tmd_lightning.models import load_transformer
from tmd_lightning.models.precision import resolve_dtype
from tmd_lightning.models.text_encoders import zero_pad_text
from tmd_lightning.models.wan_parts import forward_skipping_blocks
from tmd_lightning.quiet import quiet_third_party
from tmd_lightning.sampling import VelocityFn, cfg_velocity, teacher_sample
from tmd_lightning.stages.teacher import TeacherStage

log = logging.getLogger(__name__)
register_resolvers()

EXTRA_TENSORS = ["noise"]  # stored per pair besides the cache's latents (the teacher sample) and text


# ------------------------------------------------------------------------------------------------ what is planned


def pair_record(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The configuration pairs are made under (stored in the index; shards made under another one are redone)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    text_encoder = {k: v for k, v in model["text_encoder"].items() if k != "cache_dir"}
    return {"kind": "kd_pairs", "model": model["name"], "teacher": str(cfg.teacher), "codec": model["codec"],
            "text_encoder": text_encoder, "negative_prompt": model["negative_prompt"],
            "num_frames": int(cfg.num_frames), "height": int(cfg.height), "width": int(cfg.width),
            "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "skip_layers": skip_layer_settings(cfg),
            "teacher_dtype": str(resolve_dtype(cfg.teacher_dtype, device)).removeprefix("torch."),
            "seed": int(cfg.seed), "dtype": str(cfg.dtype)}


def skip_layer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The skip-layer guidance settings: blocks skipped in CFG's unconditional branch, and the steps' window."""
    return {"blocks": [int(b) for b in cfg.skip_layers], "start": float(cfg.skip_layers_start),
            "end": float(cfg.skip_layers_end)}


def plan_pairs(num_pairs: int, num_val_pairs: int, prompts: list[str]) -> dict[str, list[tuple[int, str]]]:
    """(pair index, prompt) per split: training pairs 0 .. num_pairs - 1, then the validation pairs; prompt i mod P."""
    if num_pairs < 1 or num_val_pairs < 0:
        raise ValueError(f"num_pairs must be >= 1 and num_val_pairs >= 0, got {num_pairs} and {num_val_pairs}")
    splits = {"train": range(num_pairs), "val": range(num_pairs, num_pairs + num_val_pairs)}
    return {name: [(i, prompts[i % len(prompts)]) for i in rows] for name, rows in splits.items() if rows}


# ------------------------------------------------------------------------------------------------ the teacher


class Teacher:
    """The teacher as a `TeacherStage` (its sampler, text encoder and codec), loaded on first use: a rerun over a
    finished cache loads no network, and one that only needs the prompts file loads the text encoder alone."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    @cached_property
    def text_encoder(self) -> torch.nn.Module:
        return instantiate(self.cfg.model.text_encoder).to(self.device).eval()

    @cached_property
    def stage(self) -> TeacherStage:
        transformer = load_transformer(self.cfg.teacher)
        check_skip_layers(skip_layer_settings(self.cfg), self.cfg.sampler.cfg, transformer.config.num_layers)
        stage = TeacherStage(transformer, instantiate(self.cfg.model.codec), self.text_encoder, optimizer=None,
                             negative_prompt=self.cfg.model.negative_prompt)
        return prepare_stage(stage, self.device, self.cfg.teacher_dtype)  # weights in bf16 on GPU by default


def check_skip_layers(settings: dict[str, Any], cfg_scale: float, num_layers: int | None = None) -> None:
    """Clear errors for skip-layer settings the teacher cannot run (the block range once its size is known)."""
    if not settings["blocks"]:
        return
    bad = [b for b in settings["blocks"] if num_layers is not None and not 0 <= b < num_layers]
    if bad:
        raise ValueError(f"skip_layers {bad}: the teacher has blocks 0 .. {num_layers - 1}")
    if cfg_scale == 1.0:
        raise ValueError("skip_layers acts on CFG's unconditional branch; it needs sampler.cfg != 1")
    if not 0.0 <= settings["start"] < settings["end"] <= 1.0:
        raise ValueError(f"need 0 <= skip_layers_start < skip_layers_end <= 1, got {settings['start']} and "
                         f"{settings['end']}")


def skip_layer_velocity(stage: TeacherStage, text: torch.Tensor, neg: torch.Tensor, scale: float,
                        settings: dict[str, Any], steps: int) -> VelocityFn:
    """CFG whose unconditional branch skips the blocks `settings["blocks"]` on the steps from `start` to `end` (as
    fractions of the `steps` of one sampling run): `v_neg,skip + w (v_cond - v_neg,skip)`; plain CFG elsewhere.

    The sampler calls the velocity once per step, in order, so the i-th call is step i (make one per run)."""
    plain = cfg_velocity(stage.velocity, text, neg, scale)
    calls = itertools.count()

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not settings["start"] <= next(calls) / steps < settings["end"]:
            return plain(x, t)
        v_cond = stage.velocity(x, t, text)
        v_neg = forward_skipping_blocks(stage.transformer, x, t, neg, settings["blocks"])
        return v_neg + scale * (v_cond - v_neg)

    return velocity


@torch.no_grad()
def teacher_samples(stage: TeacherStage, noise: torch.Tensor, text: torch.Tensor, sampler: dict[str, Any],
                    skip_layers: dict[str, Any]) -> torch.Tensor:
    """The teacher's samples from `noise`: its own sampler (`TeacherStage.sample_latents`), with skip-layer guidance
    when `skip_layers["blocks"]` is not empty."""
    if not skip_layers["blocks"]:
        return stage.sample_latents(noise, text, **sampler)
    neg = stage.negative_embedding(noise.shape[0])
    velocity = skip_layer_velocity(stage, text, neg, sampler["cfg"], skip_layers, sampler["steps"])
    return teacher_sample(velocity, noise, sampler["steps"], sampler["gamma"], sampler["solver"])


# ------------------------------------------------------------------------------------------------ writing shards


def make_shard(teacher: Teacher, pairs: list[tuple[int, str]], cfg: DictConfig
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[dict]]:
    """Teacher samples, trimmed text embeddings, noises and sample records of one shard's pairs."""
    dtype = getattr(torch, cfg.dtype)
    stage = teacher.stage
    shape = stage.latent_shape(cfg.num_frames, cfg.height, cfg.width)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    latents, texts, noises, samples = [], [], [], []
    for start in range(0, len(pairs), int(cfg.batch_size)):
        batch = pairs[start : start + int(cfg.batch_size)]
        captions = [prompt for _, prompt in batch]
        # noise and text rounded to the storage dtype first: what is stored is exactly what the teacher started from
        noise = stage.initial_noise([int(cfg.seed) + i for i, _ in batch], shape).to(dtype).float()
        trimmed = [t.to(dtype) for t in stage.text_encoder.encode_trimmed(captions)]
        text = zero_pad_text(trimmed, stage.text_encoder.max_length).to(teacher.device)
        x = teacher_samples(stage, noise, text, sampler, skip_layer_settings(cfg))
        for (i, caption), xi, ti, ni in zip(batch, x, trimmed, noise, strict=True):
            latents.append(xi.to(dtype).cpu())
            texts.append(ti.cpu())
            noises.append(ni.to(dtype).cpu())
            samples.append({"caption": caption, "pair": i, "latent_shape": list(xi.shape),
                            "text_shape": list(ti.shape)})
    return latents, texts, noises, samples


def write_pairs(out: Path, jobs: list[ShardJob], teacher: Teacher, cfg: DictConfig, sig: str) -> list[Path]:
    """Writes this process's missing shards among `jobs`; returns the files written."""
    written = []
    for job in jobs:
        split, k, pairs = job
        path = shard_path(out, split, k)
        if shard_current(out, job, sig) is not None:
            continue
        start = time.perf_counter()
        latents, texts, noises, samples = make_shard(teacher, pairs, cfg)
        record = {"signature": sig, "split": split, "shard": k, "rows": [list(p) for p in pairs], "samples": samples,
                  "skipped": [], "extra_tensors": EXTRA_TENSORS}
        write_shard(path, latents, texts, record, extra={"noise": noises})
        written.append(path)
        log.info("%s: wrote %s (%d pairs, %.1f s)", split, path.name, len(samples), time.perf_counter() - start)
    return written


# ------------------------------------------------------------------------------------------------ the command


def run(cfg: DictConfig) -> dict[str, Any]:
    """Writes this process's missing shards of the pair cache `cfg.output`, then the index when every shard is done.

    Returns {"written": shard files written now, "index": the index or None (other ranks still at work), "output"}.
    """
    rank, world_size = process_share(cfg.rank, cfg.world_size)
    check_skip_layers(skip_layer_settings(cfg), float(cfg.sampler.cfg))
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    record = pair_record(cfg, device)
    sig = signature(record)
    previous = previous_index(out, record)
    prompts = resolve_prompts(cfg.prompts)
    jobs = plan_shards(plan_pairs(int(cfg.num_pairs), int(cfg.num_val_pairs), prompts), int(cfg.shard_size))
    teacher = Teacher(cfg, device)
    written = write_pairs(out, my_share(jobs, rank, world_size), teacher, cfg, sig)
    records = finished_shards(out, jobs, sig)
    index = None
    if records is not None:  # the last rank done merges
        captions = list(dict.fromkeys([cfg.model.negative_prompt, *(p for job in jobs for _, p in job.rows)]))
        stored = store_prompts(out, captions, lambda c: teacher.text_encoder.encode_trimmed(c),
                               getattr(torch, cfg.dtype), cfg.model.negative_prompt,
                               previous and previous.get("prompts"), sig)
        index = build_index(out, jobs, records, record, sig, stored, EXTRA_TENSORS)
        write_index(out, index)
    _report(out, index, written, rank, world_size, cfg)
    return {"written": written, "index": index, "output": out}


def _report(out: Path, index: dict[str, Any] | None, written: list[Path], rank: int, world_size: int,
            cfg: DictConfig) -> None:
    if not report_share(out / INDEX_FILE, index is not None, written, rank, world_size):
        return
    for name, split in index["splits"].items():
        print(f"{name}: {split['num_samples']} pairs in {len(split['shards'])} shards")
    print(f"pairs:   {out}\ntrain:   python -m tmd_lightning.fit experiment=kd_warmup model={cfg.model.name} "
          f"data.cache_dir={out}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="kd_pairs")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    run(cfg)


if __name__ == "__main__":
    main()

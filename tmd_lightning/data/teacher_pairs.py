"""The teacher's noise -> sample pairs for the KD warm-up of the one-step DMD2-v baseline (the paper's Table 7;
`python -m tmd_lightning.kd_pairs`).

Pair i: noise `eps_i ~ N(0, I)` from a generator seeded with `seed + i` (rounded to the storage dtype, so the stored
noise is exactly what the teacher started from), prompt `i mod P`, and the teacher's sample from `eps_i` with its own
sampler (`TeacherStage.sample_latents`: 50 Euler steps, the model's CFG), optionally with skip-layer guidance
(`skip_layers`, our reading of the paper's "skip-layer 10"; see configs/kd_pairs.yaml). The pairs are a latent cache
(`cache_writer.py`) whose shards also hold each pair's noise (`noise.<j>`).
"""

from __future__ import annotations

import itertools
from functools import cached_property
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.data.cache_writer import ShardContent
from tmd_lightning.data.sharding import ShardJob
from tmd_lightning.evaluation import prepare_stage
from tmd_lightning.models import load_transformer
from tmd_lightning.models.precision import resolve_dtype
from tmd_lightning.models.text_encoders import zero_pad_text
from tmd_lightning.models.wan_parts import forward_skipping_blocks
from tmd_lightning.sampling import VelocityFn, cfg_velocity, teacher_sample
from tmd_lightning.stages.teacher import TeacherStage

EXTRA_TENSORS = ["noise"]  # stored per pair besides the cache's latents (the teacher sample) and text
LOG_FORMAT = "{split}: wrote {file} ({samples} pairs, {seconds:.1f} s)"  # one line per shard written


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


# ------------------------------------------------------------------------------------------------ skip-layer guidance


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

    def encode_trimmed(self, captions: list[str]) -> list[torch.Tensor]:
        """The captions' text embeddings, each trimmed to its real token length (loads the text encoder alone)."""
        return self.text_encoder.encode_trimmed(captions)

    def make_shard(self, job: ShardJob) -> ShardContent:
        """Teacher samples, trimmed text embeddings, noises and sample records of one shard's pairs."""
        cfg = self.cfg
        dtype = getattr(torch, cfg.dtype)
        stage = self.stage
        shape = stage.latent_shape(cfg.num_frames, cfg.height, cfg.width)
        sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
        latents, texts, noises, samples = [], [], [], []
        for start in range(0, len(job.rows), int(cfg.batch_size)):
            batch = job.rows[start : start + int(cfg.batch_size)]
            captions = [prompt for _, prompt in batch]
            # noise and text rounded to the storage dtype first: what is stored is what the teacher started from
            noise = stage.initial_noise([int(cfg.seed) + i for i, _ in batch], shape).to(dtype).float()
            trimmed = [t.to(dtype) for t in stage.text_encoder.encode_trimmed(captions)]
            text = zero_pad_text(trimmed, stage.text_encoder.max_length).to(self.device)
            x = teacher_samples(stage, noise, text, sampler, skip_layer_settings(cfg))
            for (i, caption), xi, ti, ni in zip(batch, x, trimmed, noise, strict=True):
                latents.append(xi.to(dtype).cpu())
                texts.append(ti.cpu())
                noises.append(ni.to(dtype).cpu())
                samples.append({"caption": caption, "pair": i, "latent_shape": list(xi.shape),
                                "text_shape": list(ti.shape)})
        return ShardContent(latents, texts, samples, extra={"noise": noises})

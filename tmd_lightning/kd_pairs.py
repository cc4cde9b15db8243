"""Entry point: `python -m tmd_lightning.kd_pairs [model=NAME] [prompts=FILE] [num_pairs=N] [output=DIR]` — the
teacher's noise -> sample pairs for the KD warm-up of the one-step DMD2-v baseline (the paper's Table 7).

Pair i: noise `eps_i ~ N(0, I)` from a generator seeded with `seed + i` (rounded to the storage dtype, so the stored
noise is exactly what the teacher started from), prompt `i mod P`, and the teacher's sample from `eps_i` with its own
sampler (`TeacherStage.sample_latents`: 50 Euler steps, the model's CFG), optionally with skip-layer guidance
(`skip_layers`, our reading of the paper's "skip-layer 10"; see configs/kd_pairs.yaml). The pairs themselves are
`data/teacher_pairs.py`'s.

The pairs are a cache in `precompute`'s layout (`data/cache.py`), so `data=cache` serves them: per pair `latents.<j>`
(the teacher's sample), `text.<j>` (the prompt's text embedding, trimmed) and the extra tensor `noise.<j>`; the index
names the prompts, and `prompts.safetensors` holds the negative prompt and every prompt used. Shards are written
atomically; a rerun writes only missing, damaged or outdated shards (and loads no network when none is). Launched
with torchrun (RANK / WORLD_SIZE) or SLURM, rank r of W writes shards r, r + W, r + 2W, ... of the list of all
shards (training, then validation); the rank that finds every shard finished writes `prompts.safetensors` and then
`index.json` (a rerun with any number of processes completes a cache whose index is missing): the split and merge of
`data/sharding.py` and the writer of `data/cache_writer.py`, shared with `precompute` and `generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tmd_lightning.config import hydra_entry
from tmd_lightning.data.cache_writer import CacheWriter
from tmd_lightning.data.sharding import plan_shards, process_share
from tmd_lightning.data.teacher_pairs import (
    EXTRA_TENSORS,
    LOG_FORMAT,
    Teacher,
    check_skip_layers,
    pair_record,
    plan_pairs,
    skip_layer_settings,
)
from tmd_lightning.evaluation import resolve_device, resolve_prompts


def run(cfg: DictConfig) -> dict[str, Any]:
    """Writes this process's missing shards of the pair cache `cfg.output`, then the index when every shard is done.

    Returns {"written": shard files written now, "index": the index or None (other ranks still at work), "output"}.
    """
    rank, world_size = process_share(cfg.rank, cfg.world_size)
    check_skip_layers(skip_layer_settings(cfg), float(cfg.sampler.cfg))
    device = resolve_device(cfg.device)
    writer = CacheWriter(Path(cfg.output), pair_record(cfg, device), rank, world_size, EXTRA_TENSORS)
    prompts = resolve_prompts(cfg.prompts)
    jobs = plan_shards(plan_pairs(int(cfg.num_pairs), int(cfg.num_val_pairs), prompts), int(cfg.shard_size))
    teacher = Teacher(cfg, device)
    written = writer.write_share(jobs, teacher.make_shard, LOG_FORMAT)
    index = writer.merge(jobs, cfg.model.negative_prompt, lambda: (p for job in jobs for _, p in job.rows),
                         teacher.encode_trimmed, getattr(torch, cfg.dtype))  # the prompts: every one a pair uses
    if writer.report(written, index):
        for name, split in index["splits"].items():
            print(f"{name}: {split['num_samples']} pairs in {len(split['shards'])} shards")
        print(f"pairs:   {writer.out}\ntrain:   python -m tmd_lightning.fit experiment=kd_warmup "
              f"model={cfg.model.name} data.cache_dir={writer.out}")
    return {"written": written, "index": index, "output": writer.out}


@hydra_entry("kd_pairs")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

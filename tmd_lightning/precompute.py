"""Entry point: `python -m tmd_lightning.precompute data.train_manifest=M model=NAME output=DIR` — a training cache.

Reads the manifest(s) through the same DataModule as training (unusable files are skipped, counted and recorded,
with the same `data.max_skip_fraction` limit), encodes every clip with `model.codec` (the Wan VAE stores normalised
latents `(z - mean) / std`) and every caption with `model.text_encoder` (stored trimmed to its real token length),
in shards of `shard_size` samples, plus the negative prompt and any evaluation `prompts`. Finished shards are kept:
a rerun after a crash encodes only what is missing (and loads no encoder when nothing is). `index.json` is written
last and atomically. Train from the cache with `data=cache data.cache_dir=DIR` (see `configs/data/cache.yaml`).
The encoding is `data/encoding.py`'s, the writing `data/cache_writer.py`'s.

Launched with torchrun or srun (`torchrun --nproc-per-node=8 -m tmd_lightning.precompute ...`), rank r of W encodes
shards r, r + W, ... of the list of all shards (training, then validation) and the last rank done writes the prompts
and the one merged index (`data/sharding.py`); a rerun with any number of processes completes an unfinished cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tmd_lightning.config import hydra_entry
from tmd_lightning.data.cache_writer import CacheWriter
from tmd_lightning.data.encoding import LOG_FORMAT, Encoders, ShardEncoder, cache_record, manifest_rows, split_datasets
from tmd_lightning.data.sharding import plan_shards, process_share
from tmd_lightning.evaluation import resolve_device, resolve_prompts


def run(cfg: DictConfig) -> dict[str, Any]:
    """Encodes this process's share of the manifest(s) of `cfg.data` into `cfg.output`, then, when every shard is
    done, the prompts and the index (`data/sharding.py`: the last rank done merges).

    Returns {"written": shard files written now, "index": the index or None (other ranks still at work), "output"}.
    """
    rank, world_size = process_share(cfg.rank, cfg.world_size)
    writer = CacheWriter(Path(cfg.output), cache_record(cfg), rank, world_size)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # writes the toy world when data=toy
    encoders = Encoders(cfg, resolve_device(cfg.device))
    datasets, prefiltered = split_datasets(datamodule)
    jobs = plan_shards(manifest_rows(datasets), int(cfg.shard_size))
    written = writer.write_share(jobs, ShardEncoder(datasets, encoders, cfg), LOG_FORMAT)
    index = writer.merge(jobs, cfg.model.negative_prompt, lambda: resolve_prompts(cfg.prompts) if cfg.prompts else [],
                         encoders.encode_trimmed, getattr(torch, cfg.dtype), prefiltered)
    if writer.report(written, index):
        _print_summary(index, writer.out, cfg)
    return {"written": written, "index": index, "output": writer.out}


def _print_summary(index: dict[str, Any], out: Path, cfg: DictConfig) -> None:
    """What the cache holds, what was skipped, and the command that trains from it."""
    for name, split in index["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['shards'])} shards, "
              f"{split['num_skipped']} of {split['num_rows']} rows skipped")
        for rec in split["skipped"][:10]:
            print(f"  skipped {rec['path']}: {rec['reason']}")
    print(f"prompts: {len(index['prompts']['captions'])} (negative prompt + evaluation prompts)")
    print(f"cache:   {out}\ntrain:   python -m tmd_lightning.fit experiment=... model={cfg.model.name} data=cache "
          f"data.cache_dir={out} data.num_frames={cfg.data.num_frames} data.height={cfg.data.height} "
          f"data.width={cfg.data.width}")


@hydra_entry("precompute")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

"""Entry point: `python -m tmd_lightning.precompute data.train_manifest=M model=NAME output=DIR` — a training cache.

Reads the manifest(s) through the same DataModule as training (unusable files are skipped, counted and recorded,
with the same `data.max_skip_fraction` limit), encodes every clip with `model.codec` (the Wan VAE stores normalised
latents `(z - mean) / std`) and every caption with `model.text_encoder` (stored trimmed to its real token length),
in shards of `shard_size` samples, plus the negative prompt and any evaluation `prompts`. Finished shards are kept:
a rerun after a crash encodes only what is missing (and loads no encoder when nothing is). `index.json` is written
last and atomically. Train from the cache with `data=cache data.cache_dir=DIR` (see `configs/data/cache.yaml`).

Launched with torchrun or srun (`torchrun --nproc-per-node=8 -m tmd_lightning.precompute ...`), rank r of W encodes
shards r, r + W, ... of the list of all shards (training, then validation) and the last rank done writes the prompts
and the one merged index (`data/sharding.py`); a rerun with any number of processes completes an unfinished cache.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
from tmd_lightning.data.dataset import SkipCounter, VideoTextDataset, collate_videos
from tmd_lightning.data.sharding import ShardJob, my_share, plan_shards, process_share, report_share
from tmd_lightning.evaluation import resolve_device, resolve_prompts
from tmd_lightning.quiet import quiet_third_party

log = logging.getLogger(__name__)
register_resolvers()


def cache_record(cfg: DictConfig) -> dict[str, Any]:
    """The configuration a cache is made under (stored in its index; shards of another one are redone)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    text_encoder = {k: v for k, v in model["text_encoder"].items() if k != "cache_dir"}
    return {"model": model["name"], "codec": model["codec"], "text_encoder": text_encoder,
            "num_frames": int(cfg.data.num_frames), "height": int(cfg.data.height), "width": int(cfg.data.width),
            "frame_stride": int(cfg.data.get("frame_stride", 1)), "dtype": str(cfg.dtype)}


class Encoders:
    """The codec and text encoder, each loaded on first use: a rerun over a finished cache loads neither."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    @cached_property
    def codec(self) -> nn.Module:
        return instantiate(self.cfg.model.codec).to(self.device).eval()

    @cached_property
    def text_encoder(self) -> nn.Module:
        dtype = self.cfg.text_encoder_dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        kwargs = {"dtype": dtype} if dtype else {}
        return instantiate(self.cfg.model.text_encoder, **kwargs).to(self.device).eval()


class _Rows(Dataset):
    """A dataset's items for some of its rows, each tagged with its row (so samples keep their source path)."""

    def __init__(self, dataset: VideoTextDataset, rows: list[int]) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[self.rows[i]], "row": self.rows[i]}


def _collate_rows(items: list[dict[str, Any]]) -> dict[str, Any]:
    return collate_videos(items) | {"rows": [it["row"] for it in items if "skip" not in it]}


@torch.no_grad()
def encode_shard(dataset: VideoTextDataset, rows: list[int], encoders: Encoders, cfg: DictConfig,
                 skips: SkipCounter) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict], list[dict]]:
    """Latents, trimmed text embeddings, sample records and skip records of one shard's rows."""
    dtype = getattr(torch, cfg.dtype)
    loader = DataLoader(_Rows(dataset, rows), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        collate_fn=_collate_rows)
    latents, texts, samples, skipped = [], [], [], []
    for batch in loader:
        skips.update(batch["num_items"], batch["skipped"])  # raises past data.max_skip_fraction, like training
        skipped += [{"path": r.path, "reason": r.reason} for r in batch["skipped"]]
        if not batch["caption"]:
            continue
        z = encoders.codec.encode(batch["video"].to(encoders.device)).to(dtype).cpu()
        text = [t.to(dtype).cpu() for t in encoders.text_encoder.encode_trimmed(batch["caption"])]
        for row, zi, ti, caption in zip(batch["rows"], z, text, batch["caption"], strict=True):
            latents.append(zi)
            texts.append(ti)
            samples.append({"caption": caption, "path": str(dataset.entries[row].path),
                            "latent_shape": list(zi.shape), "text_shape": list(ti.shape)})
    return latents, texts, samples, skipped


def encode_shards(out: Path, jobs: list[ShardJob], datasets: dict[str, VideoTextDataset], encoders: Encoders,
                  cfg: DictConfig, sig: str) -> list[Path]:
    """Writes this process's missing shards among `jobs` (shard k of a split covers its usable rows k * shard_size
    onwards); returns the files written. Unusable files count against `data.max_skip_fraction` per split, over the
    rows this process encodes."""
    skips = {split: SkipCounter(max_fraction=cfg.data.max_skip_fraction) for split in datasets}
    written = []
    for job in jobs:
        if shard_current(out, job, sig) is not None:
            continue
        start = job.shard * int(cfg.shard_size)
        rows = list(range(start, start + len(job.rows)))
        latents, texts, samples, skipped = encode_shard(datasets[job.split], rows, encoders, cfg, skips[job.split])
        record = {"signature": sig, "split": job.split, "shard": job.shard, "rows": job.rows, "samples": samples,
                  "skipped": skipped}
        path = shard_path(out, job.split, job.shard)
        write_shard(path, latents, texts, record)
        written.append(path)
        log.info("%s: wrote %s (%d samples, %d skipped)", job.split, path.name, len(samples), len(skipped))
    return written


def encode_prompts(out: Path, cfg: DictConfig, encoders: Encoders, previous: dict[str, Any] | None,
                   sig: str) -> dict[str, Any]:
    """Stores the negative prompt and the evaluation prompts (trimmed) unless the same set is already there."""
    extra = resolve_prompts(cfg.prompts) if cfg.prompts else []
    captions = list(dict.fromkeys([cfg.model.negative_prompt, *extra]))
    return store_prompts(out, captions, lambda c: encoders.text_encoder.encode_trimmed(c), getattr(torch, cfg.dtype),
                         cfg.model.negative_prompt, previous, sig)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Encodes this process's share of the manifest(s) of `cfg.data` into `cfg.output`, then, when every shard is
    done, the prompts and the index (`data/sharding.py`: the last rank done merges).

    Returns {"written": shard files written now, "index": the index or None (other ranks still at work), "output"}.
    """
    rank, world_size = process_share(cfg.rank, cfg.world_size)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    record = cache_record(cfg)
    sig = signature(record)
    previous = previous_index(out, record)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # writes the toy world when data=toy
    encoders = Encoders(cfg, resolve_device(cfg.device))
    datasets, prefiltered = {}, {}
    for split in ("train", "val"):
        before = len(datamodule.skips.skipped)
        dataset = datamodule.split_dataset(split)
        if dataset is None:
            continue
        datasets[split] = dataset
        prefiltered[split] = [{"path": r.path, "reason": r.reason} for r in datamodule.skips.skipped[before:]]
    plan = {split: [[str(e.path), e.caption] for e in dataset.entries] for split, dataset in datasets.items()}
    jobs = plan_shards(plan, int(cfg.shard_size))
    written = encode_shards(out, my_share(jobs, rank, world_size), datasets, encoders, cfg, sig)
    records = finished_shards(out, jobs, sig)
    index = None
    if records is not None:  # the last rank done merges
        prompts = encode_prompts(out, cfg, encoders, previous and previous.get("prompts"), sig)
        index = build_index(out, jobs, records, record, sig, prompts, prefiltered=prefiltered)
        write_index(out, index)
    _report(out, index, written, rank, world_size, cfg)
    return {"written": written, "index": index, "output": out}


def _report(out: Path, index: dict[str, Any] | None, written: list[Path], rank: int, world_size: int,
            cfg: DictConfig) -> None:
    if not report_share(out / INDEX_FILE, index is not None, written, rank, world_size):
        return
    for name, split in index["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['shards'])} shards, "
              f"{split['num_skipped']} of {split['num_rows']} rows skipped")
        for rec in split["skipped"][:10]:
            print(f"  skipped {rec['path']}: {rec['reason']}")
    print(f"prompts: {len(index['prompts']['captions'])} (negative prompt + evaluation prompts)")
    print(f"cache:   {out}\ntrain:   python -m tmd_lightning.fit experiment=... model={cfg.model.name} data=cache "
          f"data.cache_dir={out} data.num_frames={cfg.data.num_frames} data.height={cfg.data.height} "
          f"data.width={cfg.data.width}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="precompute")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    run(cfg)


if __name__ == "__main__":
    main()

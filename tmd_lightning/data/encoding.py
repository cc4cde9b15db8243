"""A manifest's clips and captions encoded into latent-cache shards (`python -m tmd_lightning.precompute`).

The clips come through the same DataModule as training (unusable files are skipped, counted and recorded, with the
same `data.max_skip_fraction` limit); every clip is encoded with `model.codec` (the Wan VAE stores normalised latents
`(z - mean) / std`) and every caption with `model.text_encoder` (stored trimmed to its real token length). The
encoders load on first use, so a rerun over a finished cache loads neither. `cache_writer.py` writes the shards.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tmd_lightning.data.cache_writer import ShardContent
from tmd_lightning.data.dataset import SkipCounter, VideoTextDataset, collate_videos
from tmd_lightning.data.sharding import ShardJob

LOG_FORMAT = "{split}: wrote {file} ({samples} samples, {skipped} skipped)"  # one line per shard written


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

    def encode_trimmed(self, captions: list[str]) -> list[torch.Tensor]:
        """The captions' text embeddings, each trimmed to its real token length (loads the text encoder)."""
        return self.text_encoder.encode_trimmed(captions)


def split_datasets(datamodule: L.LightningDataModule) -> tuple[dict[str, VideoTextDataset], dict[str, list[dict]]]:
    """The DataModule's dataset per split, and per split the files it dropped before any shard is planned (missing
    ones), as skip records."""
    datasets, prefiltered = {}, {}
    for split in ("train", "val"):
        before = len(datamodule.skips.skipped)
        dataset = datamodule.split_dataset(split)
        if dataset is None:
            continue
        datasets[split] = dataset
        prefiltered[split] = [{"path": r.path, "reason": r.reason} for r in datamodule.skips.skipped[before:]]
    return datasets, prefiltered


def manifest_rows(datasets: dict[str, VideoTextDataset]) -> dict[str, list[list[str]]]:
    """What the shards cover, per split: every usable manifest row as (path, caption)."""
    return {split: [[str(e.path), e.caption] for e in dataset.entries] for split, dataset in datasets.items()}


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


class ShardEncoder:
    """Makes a shard of a split from its usable rows (shard k covers rows k * shard_size onwards). Unusable files count
    against `data.max_skip_fraction` per split, over the rows this process encodes."""

    def __init__(self, datasets: dict[str, VideoTextDataset], encoders: Encoders, cfg: DictConfig) -> None:
        self.datasets, self.encoders, self.cfg = datasets, encoders, cfg
        self.skips = {split: SkipCounter(max_fraction=cfg.data.max_skip_fraction) for split in datasets}

    def __call__(self, job: ShardJob) -> ShardContent:
        start = job.shard * int(self.cfg.shard_size)
        rows = list(range(start, start + len(job.rows)))
        latents, texts, samples, skipped = encode_shard(self.datasets[job.split], rows, self.encoders, self.cfg,
                                                        self.skips[job.split])
        return ShardContent(latents, texts, samples, skipped)

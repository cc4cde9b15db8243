"""Precomputed caches (docs/method.md §7): latents and trimmed text embeddings in shards, an index, and the DataModule
that trains from them without running the codec's encoder or the text encoder.

Layout of a cache folder (written by `python -m tmd_lightning.precompute`):

    index.json                      written last and atomically: the config that produced the cache, per split the
                                    shards with each sample's caption, source path and shapes, and the skipped files
    prompts.safetensors             the negative prompt and evaluation prompts, trimmed (read by `CachedTextEncoder`)
    <split>/shard_00000.safetensors `latents.<j>` (C, T, h, w) and `text.<j>` (length, D) per sample; the shard's own
                                    record (signature, planned rows, samples, skips) is in its safetensors metadata

A cache may hold further per-sample tensors, named in its index and shard records as `extra_tensors` (the KD pair
cache of `python -m tmd_lightning.kd_pairs` stores `noise.<j>`, the teacher's initial noise, next to `latents.<j>`,
the teacher's sample from it); the dataset serves them under their names.

A shard covers a fixed slice of the split's usable manifest rows, so a rerun knows which shards it still needs: a
shard file is written atomically (temporary name, then rename) and is reused only when it opens, holds every tensor
its record names, and its record matches the plan and the config signature; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from tmd_lightning.data.dataset import SkipCounter, SkipRecord
from tmd_lightning.data.sharding import ShardJob, atomic_write_text, current_record, finished_records

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
CACHE_VERSION = 1
SHARD_KEY = "tmd_cache"  # safetensors metadata key holding a shard's record
IGNORED_KEYS = ("path", "cache_dir", "pretrained")  # where a model lives may differ between machines


class CacheError(ValueError):
    """A cache folder that cannot serve this run: missing, unfinished, or made with another configuration."""


# ------------------------------------------------------------------------------------------------ files and shards


def signature(record: dict[str, Any]) -> str:
    """A short hash of a cache's config record: shards made under another config are not reused."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_path(cache_dir: str | Path, split: str, index: int) -> Path:
    return Path(cache_dir) / split / f"shard_{index:05d}.safetensors"


def write_shard(path: Path, latents: list[torch.Tensor], texts: list[torch.Tensor], record: dict[str, Any],
                extra: dict[str, list[torch.Tensor]] | None = None) -> None:
    """Saves one shard atomically: per-sample tensors plus the shard's record (JSON) in the file's metadata.

    `extra` holds further per-sample tensors by name (stored as `<name>.<j>`); list their names in the record's
    `extra_tensors` so `read_shard_record` checks they are all there."""
    from safetensors.torch import save_file

    tensors = {f"latents.{j}": z.contiguous().cpu() for j, z in enumerate(latents)}
    tensors |= {f"text.{j}": t.contiguous().cpu() for j, t in enumerate(texts)}
    for name, values in (extra or {}).items():
        tensors |= {f"{name}.{j}": v.contiguous().cpu() for j, v in enumerate(values)}
    if not tensors:  # every file of the shard was unusable: keep a marker so the shard counts as done
        tensors = {"empty": torch.zeros(0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={SHARD_KEY: json.dumps(record)})
    os.replace(tmp, path)


def read_shard_record(path: Path) -> dict[str, Any] | None:
    """The record of a complete shard, or None when the file is missing, truncated, corrupt or lacks a tensor."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            record = json.loads((fh.metadata() or {})[SHARD_KEY])
            keys = set(fh.keys())
    except (SafetensorError, OSError, KeyError, ValueError) as exc:  # truncated, garbled, or not one of ours
        log.warning("%s is unreadable (%s); it will be redone", path, exc)
        return None
    n = len(record.get("samples", []))
    names = ["latents", "text", *record.get("extra_tensors", [])]
    if not {f"{name}.{j}" for name in names for j in range(n)} <= keys:
        log.warning("%s lacks tensors its record names; it will be redone", path)
        return None
    return record


def shard_current(out: Path, job: ShardJob, sig: str) -> dict[str, Any] | None:
    """The record of `job`'s shard when it is complete and made for its rows under this configuration, else None."""
    return current_record(read_shard_record, shard_path(out, job.split, job.shard), sig, job.rows)


def finished_shards(out: Path, jobs: Sequence[ShardJob], sig: str) -> list[dict[str, Any]] | None:
    """Every shard's record when all of them are written and current (by any rank), else None."""
    return finished_records(read_shard_record, [shard_path(out, j.split, j.shard) for j in jobs], jobs, sig)


def build_index(out: Path, jobs: Sequence[ShardJob], records: list[dict[str, Any]], config: dict[str, Any], sig: str,
                prompts: dict[str, Any], extra_tensors: Sequence[str] = (),
                prefiltered: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """The merged index over every shard of the plan: per split its shards (file, samples, skipped files), the rows
    planned (plus those `prefiltered` before planning, e.g. missing files), samples and skipped files."""
    splits: dict[str, Any] = {}
    for job, rec in zip(jobs, records, strict=True):
        entry = splits.setdefault(job.split, {"shards": [], "num_rows": len(prefiltered.get(job.split, []))
                                              if prefiltered else 0, "num_samples": 0, "num_skipped": 0,
                                              "skipped": list(prefiltered.get(job.split, [])) if prefiltered else []})
        skipped = rec.get("skipped", [])
        entry["shards"].append({"file": str(shard_path(out, job.split, job.shard).relative_to(out)),
                                "samples": rec["samples"], "skipped": skipped})
        entry["num_rows"] += len(job.rows)
        entry["num_samples"] += len(rec["samples"])
        entry["skipped"] += skipped
        entry["num_skipped"] = len(entry["skipped"])
    first = next((s for rec in records for s in rec["samples"]), None)
    index = {"version": CACHE_VERSION, "config": config, "signature": sig, "prompts": prompts,
             "latent_shape": first and first["latent_shape"], "text_dim": first and first["text_shape"][-1],
             "splits": splits}
    return index | ({"extra_tensors": list(extra_tensors)} if extra_tensors else {})


def store_prompts(out: Path, captions: list[str], encode: Callable[[list[str]], list[torch.Tensor]],
                  dtype: torch.dtype, negative_prompt: str, previous: dict[str, Any] | None, sig: str
                  ) -> dict[str, Any]:
    """Stores the prompts' trimmed text embeddings (`encode`, called only when needed: a rerun over a finished cache
    loads no text encoder) unless the same set is already there; returns the index's `prompts` entry.

    Written under a name of this process's own, then renamed: ranks that finish together both write it safely."""
    from tmd_lightning.models.text_encoders import PROMPTS_FILE, save_prompt_embeddings

    done = previous is not None and previous.get("signature") == sig and previous.get("captions") == captions
    if not (done and (out / PROMPTS_FILE).is_file()):
        embeddings = encode(captions)
        own = save_prompt_embeddings(out / f"{PROMPTS_FILE}.{os.getpid()}",
                                     {c: e.to(dtype) for c, e in zip(captions, embeddings, strict=True)})
        os.replace(own, out / PROMPTS_FILE)
    return {"file": PROMPTS_FILE, "negative_prompt": negative_prompt, "captions": captions, "signature": sig}


def write_index(out: Path, index: dict[str, Any]) -> None:
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))


PRECOMPUTE_COMMAND = "python -m tmd_lightning.precompute ... output=DIR"


def read_index(cache_dir: str | Path, make_command: str = PRECOMPUTE_COMMAND) -> dict[str, Any]:
    """The index of a finished cache, with a clear error for a missing or unfinished one naming `make_command`,
    the command that writes it."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.is_file():
        kind = "precompute cache" if make_command == PRECOMPUTE_COMMAND else "cache"
        raise CacheError(f"{path} not found: {cache_dir} is not a finished {kind} (run `{make_command}` to "
                         "completion; it resumes where it stopped)")
    index = json.loads(path.read_text())
    if index.get("version") != CACHE_VERSION:
        raise CacheError(f"{path}: cache version {index.get('version')}, this code reads {CACHE_VERSION}; "
                         "recompute the cache")
    return index


def previous_index(out: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The index of an earlier run into `out`; an error if it was made under another configuration `record`."""
    path = out / INDEX_FILE
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    config = previous.get("config", {})
    problems = [f"{k}: cache has {json.dumps(config.get(k))}, run has {json.dumps(v)}" for k, v in record.items()
                if config.get(k) != v]
    if problems:
        raise CacheError(f"{out} already holds a cache made with another configuration:\n  " + "\n  ".join(problems)
                         + "\nChoose another output folder, or delete this one to recompute it.")
    return previous


# ------------------------------------------------------------------------------------------- config comparison


def _strip(value: Any) -> Any:
    """A config value without the keys that name where things live (compared across machines)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in IGNORED_KEYS}
    return value


def config_mismatches(cached: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """'key: cache has X, run has Y' for every expected key whose value differs (paths ignored)."""
    out = []
    for key, want in expected.items():
        have = cached.get(key)
        if _strip(have) != _strip(want):
            out.append(f"{key}: cache has {json.dumps(have, default=str)}, run has {json.dumps(want, default=str)}")
    return out


# ------------------------------------------------------------------------------------------- dataset and loader


class CachedLatentDataset(Dataset):
    """Yields {"latents": (C, T, h, w), "text": (length, D), "caption": str} from a split's shards, plus each of the
    cache's `extra` tensors under its name (e.g. "noise" in a KD pair cache).

    Tensors are read lazily through memory-mapped safetensors handles, opened once per process (workers reopen
    them after pickling).
    """

    def __init__(self, cache_dir: str | Path, shards: list[dict[str, Any]], extra: list[str] | tuple[str, ...] = ()
                 ) -> None:
        self.cache_dir = Path(cache_dir)
        self.extra = tuple(extra)
        self.items = [(shard["file"], j, sample["caption"]) for shard in shards
                      for j, sample in enumerate(shard["samples"])]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def _handle(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.cache_dir / file), framework="pt")
        return self._handles[file]

    def __getitem__(self, index: int) -> dict[str, Any]:
        file, j, caption = self.items[index]
        fh = self._handle(file)
        return {"latents": fh.get_tensor(f"latents.{j}"), "text": fh.get_tensor(f"text.{j}"), "caption": caption,
                **{name: fh.get_tensor(f"{name}.{j}") for name in self.extra}}


def collate_cached(items: list[dict[str, Any]], text_length: int) -> dict[str, Any]:
    """Stacks float32 latents (and any extra tensors) and zero-pads each trimmed text embedding to `text_length`
    tokens.

    Wan's cross-attention has no mask, so the padding is zeros, as the diffusers pipeline feeds it (512 for UMT5).
    """
    longest = max(it["text"].shape[0] for it in items)
    if longest > text_length:
        raise CacheError(f"a cached caption has {longest} tokens, more than the run's text length {text_length} "
                         "(model.text_encoder.max_length): the cache was made with a longer max_length")
    text = torch.zeros(len(items), text_length, items[0]["text"].shape[-1])
    for row, it in zip(text, items, strict=True):
        row[: it["text"].shape[0]] = it["text"].float()
    names = [k for k in items[0] if k not in ("latents", "text", "caption")]  # a cache's extra tensors
    extra = {k: torch.stack([it[k].float() for it in items]) for k in names}
    return {"latents": torch.stack([it["latents"].float() for it in items]), "text": text,
            "caption": [it["caption"] for it in items], **extra}


class CachedDataModule(L.LightningDataModule):
    """Serves batches of cached latents and text embeddings ({"latents", "text", "caption"}), which the stages'
    `encode_batch` consumes as they are; no video is decoded and no encoder runs.

    Args:
        cache_dir: a folder written by `python -m tmd_lightning.precompute`.
        num_frames, height, width: the run's clip size (the sampling callbacks use it too); must match the cache.
        text_length: tokens each text embedding is zero-padded to (the text encoder's max_length: 512 for UMT5).
        expect: config values of the run that must match the cache's record (model name, codec, text encoder,
            negative prompt); keys naming where a model lives (`path`, `pretrained`) are not compared.
        make_command: the command that writes the cache, named in the error when it is missing or unfinished.
    """

    def __init__(
        self,
        cache_dir: str,
        num_frames: int,
        height: int,
        width: int,
        text_length: int = 512,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        expect: dict[str, Any] | None = None,
        make_command: str = PRECOMPUTE_COMMAND,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.num_frames, self.height, self.width, self.text_length = num_frames, height, width, text_length
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size or batch_size, num_workers
        self.expect = dict(expect or {})
        self.make_command = make_command
        self.skips = SkipCounter()
        self.train_set: CachedLatentDataset | None = None
        self.val_set: CachedLatentDataset | None = None

    def check(self, index: dict[str, Any]) -> None:
        """Clear errors when the cache does not fit this run (clip size, model, codec, text encoder, prompts)."""
        config = index["config"]
        run = {"num_frames": self.num_frames, "height": self.height, "width": self.width}
        problems = config_mismatches(config, run | {k: v for k, v in self.expect.items() if k != "negative_prompt"})
        negative = self.expect.get("negative_prompt")
        if negative is not None and negative not in index["prompts"]["captions"]:
            problems.append("negative_prompt: the run's model.negative_prompt is not among the cached prompts "
                            "(precompute stores its model config's negative prompt)")
        if problems:
            raise CacheError(f"{self.cache_dir} was made for another configuration:\n  " + "\n  ".join(problems)
                             + "\nSet the run's values to the cache's (data.num_frames/height/width, model=...) or "
                             "precompute a cache for this configuration.")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        index = read_index(self.cache_dir, self.make_command)
        self.check(index)
        splits = index["splits"]
        if "train" not in splits or not any(s["samples"] for s in splits["train"]["shards"]):
            raise CacheError(f"{self.cache_dir}: the cache has no training samples")
        extra = index.get("extra_tensors", [])
        self.train_set = CachedLatentDataset(self.cache_dir, splits["train"]["shards"], extra)
        if "val" in splits:
            self.val_set = CachedLatentDataset(self.cache_dir, splits["val"]["shards"], extra)
        # what precompute skipped, for SkippedSamplesLogger
        for split in splits.values():
            self.skips.skipped.extend(SkipRecord(r["path"], r["reason"]) for r in split["skipped"])
            self.skips.seen += split["num_rows"]

    def _loader(self, dataset: CachedLatentDataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=partial(collate_cached, text_length=self.text_length),
                          drop_last=shuffle and len(dataset) >= batch_size, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)


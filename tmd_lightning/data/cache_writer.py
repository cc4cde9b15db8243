"""Writing a latent cache (the layout of `data/cache.py`) as shards split over the ranks of a launch, then its index:
what `precompute`, `kd_pairs` and `generate output_format=cache` share; `data/sharding.py` splits and merges.

A tool says what one shard holds (`ShardContent`, made from a `ShardJob`); the writer skips the shards of this rank's
share that are already current, writes the others atomically with their record, and on the rank that finds every
shard finished stores the prompts (`prompts.safetensors`) and then writes `index.json`, last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
from tmd_lightning.data.sharding import ShardJob, my_share, report_share

log = logging.getLogger(__name__)


@dataclass
class ShardContent:
    """One shard's per-sample tensors and records: latents, trimmed text embeddings, further tensors by name (`extra`,
    e.g. a KD pair's noise) and the files found unusable."""

    latents: list[torch.Tensor]
    texts: list[torch.Tensor]
    samples: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class CacheWriter:
    """A cache folder being written by one rank of `world_size`, under the configuration `record` (stored in the index;
    shards made under another one are redone, and an index of another one is an error, raised here).

    Args:
        out: the cache folder (created).
        record: the configuration the cache is made under.
        rank, world_size: this process's share (`sharding.process_share`).
        extra_tensors: the names of the per-sample tensors stored besides latents and text.
    """

    def __init__(self, out: Path, record: dict[str, Any], rank: int, world_size: int,
                 extra_tensors: Sequence[str] = ()) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.record, self.sig = record, signature(record)
        self.previous = previous_index(self.out, record)
        self.rank, self.world_size = rank, world_size
        self.extra_tensors = list(extra_tensors)

    def shard_record(self, job: ShardJob, shard: ShardContent) -> dict[str, Any]:
        """What a shard file stores about itself: the signature, its planned rows, its samples and skipped files."""
        record = {"signature": self.sig, "split": job.split, "shard": job.shard, "rows": job.rows,
                  "samples": shard.samples, "skipped": shard.skipped}
        return record | ({"extra_tensors": self.extra_tensors} if self.extra_tensors else {})

    def write_share(self, jobs: Sequence[ShardJob], make: Callable[[ShardJob], ShardContent],
                    log_format: str) -> list[Path]:
        """Writes this rank's shards among `jobs` that are missing, damaged or outdated, each from `make(job)`;
        returns the files written. Each is logged by `log_format` (fields: split, file, samples, skipped, seconds)."""
        written = []
        for job in my_share(jobs, self.rank, self.world_size):
            if shard_current(self.out, job, self.sig) is not None:
                continue
            start = time.perf_counter()
            shard = make(job)
            path = shard_path(self.out, job.split, job.shard)
            write_shard(path, shard.latents, shard.texts, self.shard_record(job, shard), extra=shard.extra or None)
            written.append(path)
            log.info(log_format.format(split=job.split, file=path.name, samples=len(shard.samples),
                                       skipped=len(shard.skipped), seconds=time.perf_counter() - start))
        return written

    def merge(self, jobs: Sequence[ShardJob], negative_prompt: str, prompts: Callable[[], Iterable[str]],
              encode: Callable[[list[str]], list[torch.Tensor]], dtype: torch.dtype,
              prefiltered: dict[str, list[dict]] | None = None) -> dict[str, Any] | None:
        """The index, when every shard of `jobs` is finished (by any rank): the negative prompt and `prompts()` are
        stored trimmed (`encode`, called only when they are not there yet), then `index.json` is written. None while
        other ranks' shards are unfinished (nothing is written then)."""
        records = finished_shards(self.out, jobs, self.sig)
        if records is None:
            return None
        captions = list(dict.fromkeys([negative_prompt, *prompts()]))
        stored = store_prompts(self.out, captions, encode, dtype, negative_prompt,
                               self.previous and self.previous.get("prompts"), self.sig)
        index = build_index(self.out, jobs, records, self.record, self.sig, stored, self.extra_tensors,
                            prefiltered=prefiltered)
        write_index(self.out, index)
        return index

    def report(self, written: Sequence[Path], index: dict[str, Any] | None, what: str = "shard(s)") -> bool:
        """Prints what this rank wrote and, while the index is not written, why; returns whether it is."""
        return report_share(self.out / INDEX_FILE, index is not None, written, self.rank, self.world_size, what)

"""Work split across the processes of a launch, written atomically, merged into one index: what `precompute`,
`kd_pairs` and `generate` share.

Each tool plans its work as a fixed list of shards (`ShardJob`: split, shard number, the rows it covers, in an order
that does not depend on the number of processes). Launched with torchrun (RANK / WORLD_SIZE) or srun
(SLURM_PROCID / SLURM_NTASKS), rank r of W takes shards r, r + W, r + 2W, ... (`my_share`); no process group is
needed, the ranks only share the output folder. A shard is written atomically (a temporary name, then a rename) and
carries its own record (signature of the configuration, its planned rows, its samples), so any process can tell a
finished shard from a missing, damaged or outdated one (`current_record`).

The merge: after its own share, every rank looks at all shards (`finished_records`). The rank that finds all of them
finished — the last one done — writes the merged index (atomically, under a name of its own process first, so two
ranks finishing together both write the same complete file safely). A rank that finds some still missing writes
nothing more and says so; a rerun with any number of processes (one is enough) writes only what is missing and then
the index. No rank waits for another, so a crashed or pre-empted rank never hangs the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

RANK_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))  # torchrun, then srun


class ShardJob(NamedTuple):
    split: str
    shard: int
    rows: list  # what the shard covers (JSON-able: it is compared with the shard's stored record)


def env_share(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process from torchrun's RANK / WORLD_SIZE or srun's SLURM_PROCID / SLURM_NTASKS;
    (0, 1) when neither is set."""
    environ = os.environ if environ is None else environ
    for rank, world in RANK_ENV:
        if rank in environ:
            return process_share(int(environ[rank]), int(environ.get(world, 1)))
    return 0, 1


def process_share(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's (rank, world size), checked; None for either takes both from the environment (`env_share`)."""
    if rank is None or world_size is None:
        return env_share()
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: need 0 <= rank < world_size")
    return rank, world_size


def plan_shards(rows_by_split: dict[str, Sequence], shard_size: int) -> list[ShardJob]:
    """Every shard of the plan, split by split, in a fixed order (the ranks' shares are taken from it)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [ShardJob(split, k, as_json(rows[start : start + shard_size])) for split, rows in rows_by_split.items()
            for k, start in enumerate(range(0, len(rows), shard_size))]


def my_share(jobs: Sequence[ShardJob], rank: int, world_size: int) -> list[ShardJob]:
    """Rank `rank`'s shards: jobs rank, rank + world_size, ..."""
    return list(jobs[rank::world_size])


def as_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparing plans with stored records."""
    return json.loads(json.dumps(value))


def current_record(read: Callable[[Path], dict[str, Any] | None], path: Path, sig: str, rows: list
                   ) -> dict[str, Any] | None:
    """The shard's record (read by `read`, None for a missing or damaged file) when it was made for these rows under
    this configuration signature, else None."""
    record = read(path)
    if record is None or record.get("signature") != sig or record.get("rows") != as_json(rows):
        return None
    return record


def finished_records(read: Callable[[Path], dict[str, Any] | None], paths: Sequence[Path], jobs: Sequence[ShardJob],
                     sig: str) -> list[dict[str, Any]] | None:
    """Every shard's record when all of them are written and current (by any rank), else None."""
    records = [current_record(read, path, sig, job.rows) for path, job in zip(paths, jobs, strict=True)]
    return None if any(r is None for r in records) else records


def atomic_write_text(path: Path, text: str) -> None:
    """Writes a file so that readers see the old or the new content, never a partial one (the temporary file is this
    process's own, so processes writing the same file at once do not interfere: the last rename wins)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def share_note(rank: int, world_size: int) -> str:
    """"rank r of W: " under a multi-process launch, else ""."""
    return f"rank {rank} of {world_size}: " if world_size > 1 else ""


def report_share(index_file: Path, merged: bool, written: Sequence[Any], rank: int, world_size: int,
                 what: str = "shard(s)") -> bool:
    """Prints what this rank wrote and, when the merged index is not written yet, why; returns `merged`."""
    who = share_note(rank, world_size)
    print(f"{who}{len(written)} {what} written now")
    if not merged:
        print(who + others_unfinished(index_file))
    return merged


def others_unfinished(index_file: Path) -> str:
    """What a rank that finished its own share but not the whole plan prints."""
    return (f"other ranks' shards are not finished yet; the last rank to finish writes {index_file} (or rerun this "
            "command with any number of processes: it writes only what is missing)")

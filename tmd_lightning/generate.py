"""Entry point: `python -m tmd_lightning.generate prompts=FILE [model=NAME] [checkpoint=TEACHER] [output=DIR]
[output_format=manifest|cache]` — a training set made by a teacher, as the paper made its own (Wan2.1 14B samples of
479k prompts).

Item i of the plan is prompt `i // seeds_per_prompt` of the prompt file (one prompt per line, or a CSV's
`caption_column`) with seed `seed + i`: its noise depends on that seed alone (`VideoStage.initial_noise`), so the
same item comes out whatever the batch, rank or rerun. The teacher samples it with its own sampler (50 Euler steps,
the model's guidance, `model.guidance_scale`).

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
over a finished set loads no network. The work itself is `data/generation.py`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tmd_lightning.config import hydra_entry
from tmd_lightning.data.cache import INDEX_FILE
from tmd_lightning.data.generation import (
    FORMATS,
    MANIFEST_FILE,
    Teacher,
    generate_cache,
    generate_manifest,
    generate_record,
    plan_items,
)
from tmd_lightning.data.sharding import plan_shards, process_share, report_share
from tmd_lightning.evaluation import resolve_device, resolve_prompts


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
    teacher = Teacher(cfg, resolve_device(cfg.device))
    manifest = cfg.output_format == "manifest"
    write = generate_manifest if manifest else generate_cache
    result: dict[str, Any] = {"manifest": None, "index": None, "output": out}
    result |= write(out, jobs, teacher, cfg, record, rank, world_size)
    done = result["manifest"] if manifest else result["index"]
    if report_share(out / (MANIFEST_FILE if manifest else INDEX_FILE), done is not None, result["written"], rank,
                    world_size, "videos" if manifest else "shards"):
        size = f"data.num_frames={cfg.num_frames} data.height={cfg.height} data.width={cfg.width}"
        source = f"data=manifest data.train_manifest={out / MANIFEST_FILE}" if manifest \
            else f"data=cache data.cache_dir={out}"
        print(f"{len(items)} items ({len(prompts)} prompts x {cfg.seeds_per_prompt} seeds) in {out}\n"
              f"train:   python -m tmd_lightning.fit experiment=... model={cfg.model.name} {source} {size}")
    return result


@hydra_entry("generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

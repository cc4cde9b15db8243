"""Entry point: `python -m tmd_lightning.sample [checkpoint=...] [prompts=...] [seeds=[...]] [sampler.steps=...]
[dtype=auto|float32|bfloat16] [tf32=true|false]`.

Writes one MP4 per (prompt, seed) as `videos/<prompt slug>_seed<n>.mp4` (H.264 yuv420p, nearest-upscaled to
`video.min_side` px on the short side so any player opens it), `videos/contact_sheet.png` (labelled frames, one row
per video), `videos/grid.gif` (all videos, one row per prompt, one column per seed) and a manifest of what it wrote
(the same format the DataModule reads); prints the effective NFE and seconds per video, and, when the prompts are toy
captions, the toy accuracy and toy-FD.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import hydra_entry
from tmd_lightning.data.manifest import write_manifest
from tmd_lightning.data.toy_world import FPS, parse_caption
from tmd_lightning.evaluation import (
    ToyReference,
    allow_tf32,
    load_stage,
    prepare_stage,
    resolve_device,
    resolve_prompts,
    toy_report,
)
from tmd_lightning.media import media_options, write_run_media
from tmd_lightning.models.precision import resolve_dtype
from tmd_lightning.progress import progress

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Samples every (prompt, seed), writes the MP4s and a manifest; returns the summary it prints."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    allow_tf32(device, cfg.get("tf32", True))
    prompts = resolve_prompts(cfg.prompts)  # checked before any model loads
    if not cfg.seeds:
        raise ValueError("seeds=[]: nothing to sample; give at least one seed, e.g. seeds=[0,1,2,3]")
    stage = prepare_stage(load_stage(cfg), device, dtype)
    pairs = [(p, int(s)) for p in prompts for s in cfg.seeds]
    sampler = stage.sampler_options(**OmegaConf.to_container(cfg.sampler, resolve=True))
    out_dir = Path(cfg.output_dir)
    videos, rows = [], []
    start = time.perf_counter()
    with torch.inference_mode():  # no autograd anywhere below: no version counters, no saved tensors
        for i in progress(range(0, len(pairs), cfg.batch_size), f"sampling {len(pairs)} videos"):
            chunk = pairs[i : i + cfg.batch_size]
            batch = stage.generate([p for p, _ in chunk], [s for _, s in chunk], cfg.num_frames, cfg.height,
                                   cfg.width, **sampler).cpu()
            videos.append(batch)
    seconds = (time.perf_counter() - start) / len(pairs)
    videos = torch.cat(videos)
    media = write_run_media(out_dir / "videos", pairs, [v.numpy() for v in videos], fps=FPS, **media_options(cfg))
    h, w = media["size"]
    for (prompt, seed), name in zip(pairs, media["videos"], strict=True):
        rows.append({"path": f"videos/{name}", "caption": prompt, "num_frames": cfg.num_frames, "height": h,
                     "width": w, "fps": FPS, "seed": seed})
    manifest = write_manifest(out_dir / "manifest.csv", rows)
    summary: dict[str, Any] = {
        "source": str(cfg.get("checkpoint") or cfg.model.pretrained), "videos": len(pairs),
        "sampler": sampler, "effective_nfe": stage.sampler_nfe(**sampler), "seconds_per_video": seconds,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "manifest": str(manifest),
        "contact_sheet": str(media["contact_sheet"]), "grid": str(media["grid"]),
    }
    try:
        for p in prompts:
            parse_caption(p)
        summary["toy"] = toy_report(videos, [p for p, _ in pairs], ToyReference.from_config(cfg))
    except ValueError:
        pass  # not toy prompts: no analytic metrics
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {len(pairs)} videos and {manifest}\ncontact sheet: {media['contact_sheet']}\n"
          f"grid:          {media['grid']}")
    print(f"effective NFE: {summary['effective_nfe']:g}   seconds per video: {seconds:.4f} ({device}, "
          f"{summary['dtype']} weights)")
    if "toy" in summary:
        t = summary["toy"]
        line = "  ".join(f"{k}: {v:.3f}" for k, v in t.items() if k.startswith("acc_"))
        fd = f"  toy-FD: {t['toy_fd']:.4f} (vs {t['toy_fd_real_count']} real)" if "toy_fd" in t else ""
        print(f"toy accuracy ({len(pairs)} videos): {line}{fd}")
        probe = t["direction_probe"]
        print("direction probe (prompted -> detected): " + "; ".join(
            f"{word}: " + " ".join(f"{k} {n}" for k, n in row.items() if n) for word, row in probe.items()))
    return summary


@hydra_entry("sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

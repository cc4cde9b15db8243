"""Entry point: `python -m tmd_lightning.evaluate` — quality against cost for the teacher and every student.

For each model (the teacher and the students listed in `models`, each a stage `.ckpt` or an exported folder) and
each of its samplers, samples the same prompts and seeds, times it, and scores it: on the toy, joint/attribute
accuracy and toy-FD against held-out real videos; at scale, FVD (StyleGAN-V protocol, a local I3D file) against a
manifest of real videos and CLIP score (a local CLIP folder), with `toy_metrics=false`. Writes `results.md`,
`results.csv` and `pareto.png` (quality against effective NFE and against seconds per video) in the run folder,
prints the table and where everything went. With `vbench_dir` set it also writes every sample in VBench's layout
(`<dir>/<model>/<prompt>-<index>.mp4`). The first `samples_per_row` videos of each row go to
`samples/<model sampler>/` in the run folder (`<prompt slug>_seed<n>.mp4`, `contact_sheet.png`, `grid.gif`), and
`samples/grid.gif` shows them side by side, one row per (model, sampler). Every MP4 is H.264 yuv420p,
nearest-upscaled to `video.min_side` px on the short side. The work is `tmd_lightning.evaluation`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import hydra_entry
from tmd_lightning.evaluation import (
    COLUMNS,
    Scorer,
    allow_tf32,
    generate_videos,
    load_model,
    prepare_stage,
    resolve_device,
    resolve_prompts,
    result_row,
    write_results,
    write_row_samples,
)
from tmd_lightning.media import media_options
from tmd_lightning.models.precision import resolve_dtype

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Samples and scores every (model, sampler); writes the table, CSV and plot; returns the rows."""
    codec, text_encoder = instantiate(cfg.model.codec), instantiate(cfg.model.text_encoder)
    prompts = resolve_prompts(cfg.prompts)
    pairs = [(p, int(s)) for p in prompts for s in cfg.seeds]
    captions, shape = [p for p, _ in pairs], (cfg.num_frames, cfg.height, cfg.width)
    score = Scorer.from_config(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    allow_tf32(device, cfg.get("tf32", True))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, kept, media = [], [], media_options(cfg)  # kept: (row label, its first samples_per_row videos)
    specs = OmegaConf.to_container(cfg.models, resolve=True)
    total = sum(len(s["samplers"]) for s in specs)
    for spec in specs:
        if not Path(spec["path"]).exists():
            if spec.get("required", False):
                raise FileNotFoundError(f"{spec['label']}: {spec['path']} does not exist")
            log.warning("skipping %s: %s does not exist (train it first)", spec["label"], spec["path"])
            continue
        stage = prepare_stage(load_model(spec["path"], codec, text_encoder, cfg.model.negative_prompt), device, dtype)
        for opts in spec["samplers"]:
            videos, seconds = generate_videos(stage, pairs, shape, cfg.batch_size, **opts)
            row = result_row(spec["label"], opts, stage, seconds)
            row |= {k: v for k, v in score(videos, captions).items() if k in COLUMNS}
            rows.append(row)
            log.info("[%d/%d] %s, %s: %s", len(rows), total, spec["label"], row["sampler"],
                     {k: row[k] for k in row if k in COLUMNS[5:]})
            if shown := write_row_samples(out, row, pairs, videos, media, cfg.get("samples_per_row"),
                                          cfg.get("vbench_dir")):
                kept.append(shown)
    if not rows:
        raise RuntimeError("nothing to evaluate: no model in `models` exists")
    table, plot = write_results(out, rows, kept, pairs, media)
    print(f"\n{table}\n\n{len(pairs)} videos per row ({len(prompts)} prompts x {len(cfg.seeds)} seeds; {device}, "
          f"{str(dtype).removeprefix('torch.')} weights)")
    print(f"table:  {out / 'results.md'}\ncsv:    {out / 'results.csv'}" + (f"\nplot:   {plot}" if plot else ""))
    if cfg.get("samples_per_row"):
        print(f"videos: {out / 'samples'} ({cfg.samples_per_row} per row; all rows side by side: "
              f"{out / 'samples' / 'grid.gif'})")
    print(f"tensorboard --logdir {cfg.paths.log_dir}   (losses, metric curves and sample videos of every stage)")
    return rows


@hydra_entry("evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

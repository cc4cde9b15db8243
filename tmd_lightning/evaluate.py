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
nearest-upscaled to `video.min_side` px on the short side.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.data.toy_world import FPS
from tmd_lightning.evaluation import (
    allow_tf32,
    generate,
    load_model,
    prepare_stage,
    resolve_device,
    resolve_prompts,
    sampler_label,
    toy_reference,
    toy_report,
)
from tmd_lightning.media import gif_grid, media_options, write_run_media, write_viewable_mp4
from tmd_lightning.models.precision import resolve_dtype
from tmd_lightning.quiet import quiet_third_party
from tmd_lightning.stages.base import VideoStage

log = logging.getLogger(__name__)
register_resolvers()

COLUMNS = ["model", "sampler", "M", "N", "H", "effective_nfe", "seconds_per_video", "acc_joint", "acc_colour",
           "acc_shape", "acc_direction", "toy_fd", "fvd", "fvd_num_real", "fvd_num_fake", "clip_score"]





def student_shape(stage: VideoStage) -> dict[str, Any]:
    """H (flow-head blocks) of a TMD student, for the table; empty for other models."""
    student = getattr(stage, "student", None)
    return {"H": student.head_blocks} if hasattr(student, "head_blocks") else {}


def folder_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)


def write_vbench(folder: Path, model: str, pairs: list[tuple[str, int]], videos: torch.Tensor,
                 min_side: int = 256) -> None:
    """VBench's layout: one folder per model, `<prompt>-<index>.mp4` with the index counting seeds per prompt."""
    target = folder / folder_name(model)
    seen: dict[str, int] = {}
    for (prompt, _), video in zip(pairs, videos, strict=True):
        index = seen.get(prompt, 0)
        seen[prompt] = index + 1
        write_viewable_mp4(target / f"{prompt}-{index}.mp4", video.numpy(), fps=FPS, min_side=min_side)


QUALITY = [("acc_joint", "joint acc", "{:.3f}"), ("toy_fd", "toy-FD", "{:.4f}"), ("fvd", "FVD", "{:.2f}"),
           ("clip_score", "CLIP score", "{:.2f}")]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The quality-vs-cost table; quality columns appear when some row has them."""
    quality = [q for q in QUALITY if any(q[0] in r for r in rows)]
    head = ["model", "sampler", "M", "N", "H", "effective NFE", "s / video", "speed-up vs first row",
            *(q[1] for q in quality)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    base = rows[0]["seconds_per_video"]
    for r in rows:
        cells = [r["model"], r["sampler"], r.get("M", ""), r.get("N", ""), r.get("H", ""),
                 f"{r['effective_nfe']:.2f}", f"{r['seconds_per_video']:.4f}", f"{base / r['seconds_per_video']:.0f}x",
                 *(fmt.format(r[key]) if key in r else "" for key, _, fmt in quality)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if any("fvd" in r for r in rows):
        r = next(r for r in rows if "fvd" in r)
        lines.append(f"\nFVD: StyleGAN-V protocol, {int(r['fvd_num_fake'])} generated vs {int(r['fvd_num_real'])} real "
                     "videos per row.")
    return "\n".join(lines)


def video_metrics(cfg: DictConfig) -> tuple[Any, Any]:
    """FVD (against `fvd.reference` manifest videos) and CLIP score, when their local paths are configured."""
    fvd = clip = None
    if cfg.get("fvd") and cfg.fvd.get("detector"):
        from tmd_lightning.data.backends import get_backend
        from tmd_lightning.data.manifest import read_manifest
        from tmd_lightning.metrics.fvd import FrechetVideoDistance, I3DFeatures

        if not cfg.fvd.get("reference"):
            raise ValueError("fvd.detector is set: also set fvd.reference, a manifest of real videos")
        entries = read_manifest(cfg.fvd.reference)[: cfg.fvd.get("num_real", 2048)]
        backend = get_backend("auto")
        fvd = FrechetVideoDistance(I3DFeatures(cfg.fvd.detector))
        for i in range(0, len(entries), 16):
            fvd.update(torch.stack([torch.from_numpy(backend.read(e.path, cfg.num_frames))
                                    for e in entries[i : i + 16]]), real=True)
        fvd = (fvd, {k: v.clone() for k, v in fvd.metric_state.items() if k.startswith("real")})
    if cfg.get("clip") and cfg.clip.get("path"):
        from tmd_lightning.metrics.clip_score import VideoCLIPScore

        clip = VideoCLIPScore(cfg.clip.path)
    return fvd, clip


def score_video_metrics(fvd: Any, clip: Any, videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if fvd is not None:
        metric, real_state = fvd
        metric.reset()
        for name, value in real_state.items():
            setattr(metric, name, value.clone())
        metric.update(videos, real=False)
        out |= {"fvd": float(metric.compute()), "fvd_num_real": metric.num_real, "fvd_num_fake": metric.num_fake}
    if clip is not None:
        clip.reset()
        clip.update(videos, captions)
        out["clip_score"] = float(clip.compute())
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost x, lower error y)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2 in points)]


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
LINESTYLES = ["-", "--", ":", "-."]


def series_of(sampler: str) -> str:
    """A sampler label without its step count: the points of one curve (`Euler 2 x CFG 5` -> `Euler x CFG 5`,
    `TMD M=2 N=4` -> `TMD N=4`, `few-step M=3` -> `few-step`)."""
    return re.sub(r"\s+", " ", re.sub(r"M=\d+", "", re.sub(r"(Euler) \d+", r"\1", sampler))).strip()


def pareto_figure(rows: list[dict[str, Any]], metric: str = "toy_fd"):
    """The figure of `pareto_plot`. One colour and one marker per model family (teacher, TMD Stage 1, TMD, DMD2-v,
    ...); each family's sampler series (the teacher's Euler at one CFG over its step counts, a TMD student at one N
    over M, DMD2-v over M) is one line through its points, sorted by cost, line style telling series of one family
    apart; log cost axes with ticks at 1, 2, 5 x 10^k written as plain numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    families = list(dict.fromkeys(r["model"] for r in rows))
    for ax, cost, label in ((axes[0], "effective_nfe", "effective NFE"), (axes[1], "seconds_per_video",
                                                                          "seconds per video")):
        for f, family in enumerate(families):
            mine = [r for r in rows if r["model"] == family]
            series = list(dict.fromkeys(series_of(r["sampler"]) for r in mine))
            for k, name in enumerate(series):
                points = sorted((r[cost], r[metric], r["sampler"]) for r in mine if series_of(r["sampler"]) == name)
                legend = family if len(series) == 1 else f"{family}: {name.removeprefix('TMD ')}"
                ax.plot([p[0] for p in points], [p[1] for p in points], color=colours[f % len(colours)],
                        marker=MARKERS[f % len(MARKERS)], linestyle=LINESTYLES[k % len(LINESTYLES)], lw=1.2,
                        markersize=6, label=legend, gid=f"{family}|{name}")
                for x, y, sampler in points:
                    ax.annotate(sampler, (x, y), fontsize=6, xytext=(4, 3), textcoords="offset points",
                                color=colours[f % len(colours)])
        points = [(r[cost], r[metric]) for r in rows]
        front = sorted(points[i] for i in pareto_front(points))
        ax.plot([p[0] for p in front], [p[1] for p in front], color="0.3", ls=(0, (1, 3)), lw=1.0, zorder=0,
                label="Pareto front", gid="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel(metric.replace("_", "-") + " (lower is better)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def pareto_plot(rows: list[dict[str, Any]], path: Path, metric: str = "toy_fd") -> Path:
    """Two panels: `metric` against effective NFE and against seconds per video (log x), Pareto fronts drawn."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, metric)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Samples and scores every (model, sampler); writes the table, CSV and plot; returns the rows."""
    codec, text_encoder = instantiate(cfg.model.codec), instantiate(cfg.model.text_encoder)
    prompts = resolve_prompts(cfg.prompts)
    pairs = [(p, int(s)) for p in prompts for s in cfg.seeds]
    shape = (cfg.num_frames, cfg.height, cfg.width)
    fvd, clip = video_metrics(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    allow_tf32(device, cfg.get("tf32", True))
    reference = toy_reference(cfg) if cfg.get("toy_metrics", True) else None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, kept = [], []  # kept: (row label, its first samples_per_row videos) for samples/grid.gif
    media = media_options(cfg)
    specs = OmegaConf.to_container(cfg.models, resolve=True)
    total, done = sum(len(s["samplers"]) for s in specs), 0
    for spec in specs:
        if not Path(spec["path"]).exists():
            if spec.get("required", False):
                raise FileNotFoundError(f"{spec['label']}: {spec['path']} does not exist")
            log.warning("skipping %s: %s does not exist (train it first)", spec["label"], spec["path"])
            continue
        stage = prepare_stage(load_model(spec["path"], codec, text_encoder, cfg.model.negative_prompt), device, dtype)
        for opts in spec["samplers"]:
            videos, seconds = generate(stage, pairs, shape, cfg.batch_size, **opts)
            row = {"model": spec["label"], "sampler": sampler_label(opts), **{k: opts[k] for k in ("M", "N")
                                                                               if k in opts},
                   **student_shape(stage), "effective_nfe": stage.sampler_nfe(**opts), "seconds_per_video": seconds}
            captions = [p for p, _ in pairs]
            if cfg.get("toy_metrics", True):
                row |= {k: v for k, v in toy_report(videos, captions, reference).items() if k in COLUMNS}
            row |= score_video_metrics(fvd, clip, videos, captions)
            rows.append(row)
            done += 1
            log.info("[%d/%d] %s, %s: %s", done, total, spec["label"], row["sampler"],
                     {k: row[k] for k in row if k in COLUMNS[5:]})
            label = f"{spec['label']}, {row['sampler']}"
            if cfg.get("vbench_dir"):
                write_vbench(Path(cfg.vbench_dir), f"{spec['label']} {row['sampler']}", pairs, videos,
                             media["min_side"])
            if cfg.get("samples_per_row"):
                n = cfg.samples_per_row
                write_run_media(out / "samples" / folder_name(label), pairs[:n], [v.numpy() for v in videos[:n]],
                                fps=FPS, **media)
                kept.append((label, [v.numpy() for v in videos[:n]]))
    if not rows:
        raise RuntimeError("nothing to evaluate: no model in `models` exists")
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if kept:  # the same prompts and seeds, one row per (model, sampler)
        n = len(kept[0][1])
        gif_grid(out / "samples" / "grid.gif", [v for _, vs in kept for v in vs], [k for k, _ in kept],
                 [f"{p} (seed {s})" for p, s in pairs[:n]], fps=FPS, tile=media["tile"], header_lines=3)
    metric = "fvd" if all("fvd" in r for r in rows) else "toy_fd" if all("toy_fd" in r for r in rows) else None
    plot = pareto_plot(rows, out / "pareto.png", metric) if metric else None
    print(f"\n{table}\n\n{len(pairs)} videos per row ({len(prompts)} prompts x {len(cfg.seeds)} seeds; {device}, "
          f"{str(dtype).removeprefix('torch.')} weights)")
    print(f"table:  {out / 'results.md'}\ncsv:    {out / 'results.csv'}" + (f"\nplot:   {plot}" if plot else ""))
    if cfg.get("samples_per_row"):
        print(f"videos: {out / 'samples'} ({cfg.samples_per_row} per row; all rows side by side: "
              f"{out / 'samples' / 'grid.gif'})")
    print(f"tensorboard --logdir {cfg.paths.log_dir}   (losses, metric curves and sample videos of every stage)")
    return rows


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    run(cfg)


if __name__ == "__main__":
    main()

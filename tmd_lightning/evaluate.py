"""Entry point: `python -m tmd_lightning.evaluate` — quality against cost for the teacher and every student.

For each model (the teacher and the students listed in `models`, each a stage `.ckpt` or an exported folder) and
each of its samplers, samples the same prompts and seeds, times it, and scores it: on the toy, joint/attribute
accuracy and toy-FD against held-out real videos. Writes `results.md`, `results.csv` and `pareto.png` (quality
against effective NFE and against seconds per video) in the run folder, prints the table and where everything went.
With `vbench_dir` set it also writes every sample in VBench's layout (`<dir>/<model>/<prompt>-<index>.mp4`);
`samples_per_row` videos of each row go to `samples/` in the run folder, in the same layout.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.data.toy_world import FPS, write_mp4
from tmd_lightning.sample import resolve_prompts, toy_reference, toy_report
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.loading import load_checkpoint_stage, load_pretrained_stage

log = logging.getLogger(__name__)
register_resolvers()

COLUMNS = ["model", "sampler", "M", "N", "H", "effective_nfe", "seconds_per_video", "acc_joint", "acc_colour",
           "acc_shape", "acc_direction", "toy_fd"]


def load_model(path: str | Path, codec: torch.nn.Module, text_encoder: torch.nn.Module,
               negative_prompt: str = "") -> VideoStage:
    """Any model `sample` takes: a stage `.ckpt` or a diffusers folder (teacher, TMD student, distilled student)."""
    if str(path).endswith(".ckpt"):
        return load_checkpoint_stage(path, codec, text_encoder)
    return load_pretrained_stage(path, codec, text_encoder, negative_prompt)


def generate(stage: VideoStage, pairs: list[tuple[str, int]], shape: tuple[int, int, int], batch_size: int,
             **sampler: Any) -> tuple[torch.Tensor, float]:
    """uint8 videos for every (prompt, seed) and the wall-clock seconds per video."""
    start = time.perf_counter()
    videos = [stage.generate([p for p, _ in pairs[i : i + batch_size]], [s for _, s in pairs[i : i + batch_size]],
                             *shape, **sampler).cpu() for i in range(0, len(pairs), batch_size)]
    return torch.cat(videos), (time.perf_counter() - start) / len(pairs)


def sampler_label(opts: dict[str, Any]) -> str:
    if "steps" in opts:
        return f"Euler {opts['steps']} x CFG {opts.get('cfg', 5.0):g}" if opts.get("cfg", 5.0) != 1 else \
            f"Euler {opts['steps']}, no CFG"
    return f"TMD M={opts['M']} N={opts['N']}" if "N" in opts else f"few-step M={opts['M']}"


def student_shape(stage: VideoStage) -> dict[str, Any]:
    """H (flow-head blocks) of a TMD student, for the table; empty for other models."""
    student = getattr(stage, "student", None)
    return {"H": student.head_blocks} if hasattr(student, "head_blocks") else {}


def write_vbench(folder: Path, model: str, pairs: list[tuple[str, int]], videos: torch.Tensor) -> None:
    """VBench's layout: one folder per model, `<prompt>-<index>.mp4` with the index counting seeds per prompt."""
    target = folder / re.sub(r"[^\w.-]+", "_", model)
    seen: dict[str, int] = {}
    for (prompt, _), video in zip(pairs, videos, strict=True):
        index = seen.get(prompt, 0)
        seen[prompt] = index + 1
        write_mp4(target / f"{prompt}-{index}.mp4", video.numpy(), fps=FPS)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["model", "sampler", "M", "N", "H", "effective NFE", "s / video", "speed-up vs first row", "joint acc",
            "toy-FD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    base = rows[0]["seconds_per_video"]
    for r in rows:
        cells = [r["model"], r["sampler"], r.get("M", ""), r.get("N", ""), r.get("H", ""),
                 f"{r['effective_nfe']:.2f}", f"{r['seconds_per_video']:.4f}", f"{base / r['seconds_per_video']:.0f}x",
                 f"{r['acc_joint']:.3f}" if "acc_joint" in r else "", f"{r['toy_fd']:.4f}" if "toy_fd" in r else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost x, lower error y)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2 in points)]


def pareto_plot(rows: list[dict[str, Any]], path: Path, metric: str = "toy_fd") -> Path:
    """Two panels: `metric` against effective NFE and against seconds per video (log x), Pareto fronts drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, cost, label in ((axes[0], "effective_nfe", "effective NFE"), (axes[1], "seconds_per_video",
                                                                          "seconds per video")):
        for model in models:
            mine = [r for r in rows if r["model"] == model]
            ax.scatter([r[cost] for r in mine], [r[metric] for r in mine], label=model, s=28)
            for r in mine:
                ax.annotate(r["sampler"], (r[cost], r[metric]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        points = [(r[cost], r[metric]) for r in rows]
        front = sorted(points[i] for i in pareto_front(points))
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric.replace("_", "-") + " (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Samples and scores every (model, sampler); writes the table, CSV and plot; returns the rows."""
    codec, text_encoder = instantiate(cfg.model.codec), instantiate(cfg.model.text_encoder)
    prompts = resolve_prompts(cfg.prompts)
    pairs = [(p, int(s)) for p in prompts for s in cfg.seeds]
    shape = (cfg.num_frames, cfg.height, cfg.width)
    reference = toy_reference(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in OmegaConf.to_container(cfg.models, resolve=True):
        if not Path(spec["path"]).exists():
            if spec.get("required", False):
                raise FileNotFoundError(f"{spec['label']}: {spec['path']} does not exist")
            log.warning("skipping %s: %s does not exist (train it first)", spec["label"], spec["path"])
            continue
        stage = load_model(spec["path"], codec, text_encoder, cfg.model.negative_prompt).eval()
        for opts in spec["samplers"]:
            videos, seconds = generate(stage, pairs, shape, cfg.batch_size, **opts)
            row = {"model": spec["label"], "sampler": sampler_label(opts), **{k: opts[k] for k in ("M", "N")
                                                                               if k in opts},
                   **student_shape(stage), "effective_nfe": stage.sampler_nfe(**opts), "seconds_per_video": seconds}
            row |= {k: v for k, v in toy_report(videos, [p for p, _ in pairs], reference).items()
                    if k in COLUMNS}
            rows.append(row)
            log.info("%s, %s: %s", spec["label"], row["sampler"], {k: row[k] for k in row if k in COLUMNS[5:]})
            if cfg.get("vbench_dir"):
                write_vbench(Path(cfg.vbench_dir), f"{spec['label']} {row['sampler']}", pairs, videos)
            if cfg.get("samples_per_row"):
                write_vbench(out / "samples", f"{spec['label']} {row['sampler']}", pairs[: cfg.samples_per_row],
                             videos[: cfg.samples_per_row])
    if not rows:
        raise RuntimeError("nothing to evaluate: no model in `models` exists")
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot = pareto_plot(rows, out / "pareto.png") if all("toy_fd" in r for r in rows) else None
    print(f"\n{table}\n\n{len(pairs)} videos per row ({len(prompts)} prompts x {len(cfg.seeds)} seeds)")
    print(f"table:  {out / 'results.md'}\ncsv:    {out / 'results.csv'}" + (f"\nplot:   {plot}" if plot else ""))
    if cfg.get("samples_per_row"):
        print(f"videos: {out / 'samples'} ({cfg.samples_per_row} per row)")
    print(f"tensorboard --logdir {cfg.paths.log_dir}   (losses, metric curves and sample videos of every stage)")
    return rows


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

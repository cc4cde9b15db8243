"""An evaluation's results on disk: the quality-against-cost table (Markdown and CSV), the Pareto plot, and the sample
videos kept per (model, sampler) row, also in VBench's layout. `evaluate` writes them; the toy study's report
(`study/report.py`) builds its own tables with `markdown_table` and writes its CSV with `write_csv`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tmd_lightning.data.toy_world import FPS
from tmd_lightning.media import gif_grid, write_run_media, write_viewable_mp4

if TYPE_CHECKING:
    from tmd_lightning.stages.base import VideoStage

COLUMNS = ["model", "sampler", "M", "N", "H", "effective_nfe", "seconds_per_video", "acc_joint", "acc_colour",
           "acc_shape", "acc_direction", "toy_fd", "fvd", "fvd_num_real", "fvd_num_fake", "clip_score"]
QUALITY = [("acc_joint", "joint acc", "{:.3f}"), ("toy_fd", "toy-FD", "{:.4f}"), ("fvd", "FVD", "{:.2f}"),
           ("clip_score", "CLIP score", "{:.2f}")]  # (key, header, format) of the table's quality columns
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]
LINESTYLES = ["-", "--", ":", "-."]


# -- tables --------------------------------------------------------------------------------------------------------


def markdown_table(head: list[str], rows: list[list[Any]], left: int = 2) -> str:
    """A Markdown table: the first `left` columns (names) left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    """The rows as CSV: `columns` (keys outside them left out, missing ones empty), or every key seen, in order."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def student_shape(stage: VideoStage) -> dict[str, Any]:
    """H (flow-head blocks) of a TMD student, for the table; empty for other models."""
    return {"H": stage.network.head_blocks} if hasattr(stage.network, "head_blocks") else {}


def result_row(model: str, opts: dict[str, Any], stage: VideoStage, seconds: float) -> dict[str, Any]:
    """A row's cost side: model, sampler, M / N / H where they apply, effective NFE and seconds per video."""
    label = stage.sampler.with_options(**opts).label()
    return {"model": model, "sampler": label, **{k: opts[k] for k in ("M", "N") if k in opts}, **student_shape(stage),
            "effective_nfe": stage.sampler_nfe(**opts), "seconds_per_video": seconds}


def results_table(rows: list[dict[str, Any]]) -> str:
    """The quality-vs-cost table; quality columns appear when some row has them."""
    quality = [q for q in QUALITY if any(q[0] in r for r in rows)]
    head = ["model", "sampler", "M", "N", "H", "effective NFE", "s / video", "speed-up vs first row",
            *(q[1] for q in quality)]
    base = rows[0]["seconds_per_video"]
    cells = [[r["model"], r["sampler"], r.get("M", ""), r.get("N", ""), r.get("H", ""), f"{r['effective_nfe']:.2f}",
              f"{r['seconds_per_video']:.4f}", f"{base / r['seconds_per_video']:.0f}x",
              *(fmt.format(r[key]) if key in r else "" for key, _, fmt in quality)] for r in rows]
    table = markdown_table(head, cells)
    if any("fvd" in r for r in rows):
        r = next(r for r in rows if "fvd" in r)
        table += (f"\n\nFVD: StyleGAN-V protocol, {int(r['fvd_num_fake'])} generated vs {int(r['fvd_num_real'])} "
                  "real videos per row.")
    return table


# -- the Pareto plot -----------------------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost x, lower error y)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2 in points)]


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


# -- sample videos -------------------------------------------------------------------------------------------------


def folder_name(label: str) -> str:
    """A row label as a folder name (runs of anything but word characters, dots and dashes become `_`)."""
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


def write_row_samples(out: Path, row: dict[str, Any], pairs: list[tuple[str, int]], videos: torch.Tensor,
                      media: dict[str, int], samples_per_row: int | None = None,
                      vbench_dir: str | Path | None = None) -> tuple[str, list[np.ndarray]] | None:
    """A row's videos on disk: all of them in VBench's layout under `vbench_dir` (when set), the first
    `samples_per_row` in `out/samples/<model sampler>/` (MP4s, contact sheet, GIF; `media.write_run_media`).
    Returns the row's label and those first videos, for the grid of all rows (None when none are kept)."""
    if vbench_dir:
        write_vbench(Path(vbench_dir), f"{row['model']} {row['sampler']}", pairs, videos, media["min_side"])
    if not samples_per_row:
        return None
    label = f"{row['model']}, {row['sampler']}"
    frames = [v.numpy() for v in videos[:samples_per_row]]
    write_run_media(out / "samples" / folder_name(label), pairs[:samples_per_row], frames, fps=FPS, **media)
    return label, frames


def write_results(out: Path, rows: list[dict[str, Any]], kept: list[tuple[str, list[np.ndarray]]],
                  pairs: list[tuple[str, int]], media: dict[str, int]) -> tuple[str, Path | None]:
    """`results.md`, `results.csv`, `samples/grid.gif` (the `kept` videos of every row side by side, one row per
    (model, sampler), when some were kept) and `pareto.png` (FVD when every row has it, else toy-FD when every row
    has that, else no plot) in `out`; returns the table and the plot's path."""
    table = results_table(rows)
    (out / "results.md").write_text(table + "\n")
    write_csv(rows, out / "results.csv", COLUMNS)
    if kept:  # the same prompts and seeds, one row per (model, sampler)
        n = len(kept[0][1])
        gif_grid(out / "samples" / "grid.gif", [v for _, vs in kept for v in vs], [k for k, _ in kept],
                 [f"{p} (seed {s})" for p, s in pairs[:n]], fps=FPS, tile=media["tile"], header_lines=3)
    metric = "fvd" if all("fvd" in r for r in rows) else "toy_fd" if all("toy_fd" in r for r in rows) else None
    return table, pareto_plot(rows, out / "pareto.png", metric) if metric else None

"""The toy study's report: tables with the seed spread, a verdict per claim with its numbers, and plots (quality
against NFE; the training curves that show whether each budget was long enough)."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from tmd_lightning.evaluation.report import markdown_table, write_csv
from tmd_lightning.study.runs import KD_FAMILY, STAGE2_EXPERIMENTS, Budget, Run, run_record, samples_file

# (key, header, format, higher is better)
METRICS = [("acc_joint", "joint", "{:.3f}", True), ("acc_colour", "colour", "{:.3f}", True),
           ("acc_shape", "shape", "{:.3f}", True), ("acc_direction", "direction", "{:.3f}", True),
           ("toy_fd", "toy-FD", "{:.3f}", False), ("coverage", "coverage", "{:.2f}", True)]
TEACHER_REF = "teacher"
# toy_eval.csv columns drawn as training curves: (column, short name, axis label)
CURVE_METRICS = (("toy/acc_joint", "joint", "joint accuracy (higher is better)"),
                 ("toy/fd", "toy-FD", "toy-FD (lower is better)"))
STAGE1_CURVE = "Stage 1, TM-MF"  # the Stage-1 family whose curve is drawn beside Stage 2's (every TMD run's init)
# videos per toy evaluation during training: the 48 toy captions x the ToyEvalCallback's 2 seeds
# (configs/callbacks/*.yaml); sets the sampling error that decides whether a curve has flattened
CURVE_VIDEOS = 96


@dataclass
class Cell:
    """One (family, sampler) over seeds: the per-seed values of every metric."""

    family: str
    sampler: str
    values: dict[str, list[float]]
    seeds: dict[str, list[int]] = field(default_factory=dict)  # metric -> the training seed of each value

    def on_seeds(self, keep: set[int]) -> Cell:
        """The cell restricted to the training seeds in `keep` (so two families compare on the seeds both have)."""
        values = {k: [v for v, s in zip(vs, self.seeds[k], strict=True) if s in keep] for k, vs in self.values.items()}
        seeds = {k: [s for s in ss if s in keep] for k, ss in self.seeds.items()}
        return Cell(self.family, self.sampler, values, seeds)

    def mean(self, key: str) -> float:
        return mean(self.values[key])

    def spread(self, key: str) -> float:
        """Half the range over seeds (0 for one seed)."""
        v = self.values[key]
        return (max(v) - min(v)) / 2

    def text(self, key: str, fmt: str) -> str:
        n = len(self.values[key])
        return fmt.format(self.mean(key)) + (f" ± {fmt.format(self.spread(key))}" if n > 1 else "")


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """Rows (one per run and sampler) -> cells keyed by (family, sampler), in first-seen order."""
    cells: dict[tuple[str, str], Cell] = {}
    for r in rows:
        cell = cells.setdefault((r["family"], r["sampler"]), Cell(r["family"], r["sampler"], {}))
        for key in ("effective_nfe", "seconds_per_video", *(m[0] for m in METRICS)):
            if key in r:
                cell.values.setdefault(key, []).append(float(r[key]))
                cell.seeds.setdefault(key, []).append(int(r.get("seed", -1)))
    return cells


def table(cells: list[Cell], reference_seconds: float | None) -> str:
    """Markdown: NFE, seconds per video (and speed-up), every metric as mean ± half-range over seeds."""
    head = ["model", "sampler", "seeds", "effective NFE", "s / video", "speed-up", *(m[1] for m in METRICS)]
    rows = []
    for c in cells:
        seconds = c.mean("seconds_per_video")
        speed = f"{reference_seconds / seconds:.0f}x" if reference_seconds else ""
        rows.append([c.family, c.sampler, str(len(c.values["effective_nfe"])), f"{c.mean('effective_nfe'):.2f}",
                     f"{seconds:.4f}", speed, *(c.text(k, f) if k in c.values else "" for k, _, f, _ in METRICS)])
    return markdown_table(head, rows)


@dataclass
class Comparison:
    """`a` against `b` on one metric: does `a` win, and by more than the seeds spread?"""

    label: str
    a: Cell
    b: Cell
    metric: str

    @property
    def higher_better(self) -> bool:
        return next(m[3] for m in METRICS if m[0] == self.metric)

    def _better(self, x: float, y: float) -> bool:
        return x > y if self.higher_better else x < y

    @property
    def common_seeds(self) -> set[int] | None:
        """The training seeds both sides have, where they differ (a family still training has fewer); None when
        they match or a side does not record its seeds."""
        sa, sb = self.a.seeds.get(self.metric), self.b.seeds.get(self.metric)
        if not sa or not sb or set(sa) == set(sb):
            return None
        return set(sa) & set(sb)

    @property
    def paired(self) -> tuple[Cell, Cell]:
        """The two cells on the seeds both have: comparing a two-seed mean with a one-seed value would mix the seed
        spread into the difference."""
        common = self.common_seeds
        if not common:  # same seeds, unrecorded seeds or none in common: compare as they are
            return self.a, self.b
        return self.a.on_seeds(common), self.b.on_seeds(common)

    @property
    def one_seed(self) -> bool:
        """Whether a side has a single training seed, so that no spread can be told from the difference."""
        a, b = self.paired
        return min(len(a.values[self.metric]), len(b.values[self.metric])) < 2

    @property
    def outcome(self) -> str:
        """"clear" (every seed of a beats every seed of b), "means" (means only), or "no"."""
        a, b = self.paired
        va, vb = a.values[self.metric], b.values[self.metric]
        if self.one_seed:  # no spread to be beyond
            return "means" if self._better(mean(va), mean(vb)) else "no"
        worst_a = min(va) if self.higher_better else max(va)
        best_b = max(vb) if self.higher_better else min(vb)
        if self._better(worst_a, best_b):
            return "clear"
        return "means" if self._better(mean(va), mean(vb)) else "no"

    def line(self) -> str:
        fmt = next(m[2] for m in METRICS if m[0] == self.metric)
        name = next(m[1] for m in METRICS if m[0] == self.metric)
        word = {"clear": "better, beyond the seed spread",
                "means": "better on one seed (no spread yet)" if self.one_seed else
                "better on the mean, within the seed spread", "no": "not better"}[self.outcome]
        a, b = self.paired
        common = self.common_seeds
        where = ""
        if common:
            listed = ", ".join(map(str, sorted(common)))
            where = (f" (on training seed{'s' if len(common) > 1 else ''} {listed}, the "
                     f"{'ones' if len(common) > 1 else 'one'} both have)")
        elif common is not None:
            where = " (no training seed in common: compared across seeds)"
        wins = self.seed_wins()
        if wins is not None and wins[1] > 1:
            word += f"; better on {wins[0]} of {wins[1]} seeds"
        return (f"- {self.label}, {name} ({'higher' if self.higher_better else 'lower'} is better): "
                f"{a.text(self.metric, fmt)} vs {b.text(self.metric, fmt)}{where} — {word}")

    def seed_wins(self) -> tuple[int, int] | None:
        """(seeds on which a beats b, seeds both have), seed by seed (same seed = same data order and, for the
        Stage-2 runs, the same Stage-1 init); None when a side does not record its seeds. Shown beside the
        verdict, which does not use it."""
        sa, sb = self.a.seeds.get(self.metric), self.b.seeds.get(self.metric)
        if not sa or not sb:
            return None
        va = dict(zip(sa, self.a.values[self.metric], strict=True))
        vb = dict(zip(sb, self.b.values[self.metric], strict=True))
        common = sorted(set(va) & set(vb))
        return sum(self._better(va[k], vb[k]) for k in common), len(common)


def verdict(comparisons: list[Comparison]) -> str:
    """One word for a claim: holds / holds on the means / mixed / does not hold."""
    outcomes = [c.outcome for c in comparisons]
    if all(o == "clear" for o in outcomes):
        return "**holds**"
    if all(o != "no" for o in outcomes):
        if all(c.one_seed for c in comparisons):
            return "**holds on one seed** (no seed spread yet)"
        return "**holds on the means** (some differences are within the seed spread)"
    if any(o != "no" for o in outcomes):
        return "**mixed**"
    return "**does not hold**"


def claims(cells: dict[tuple[str, str], Cell]) -> list[tuple[str, list[Comparison], str]]:
    """The paper's five claims as comparisons between cells that exist (none yet: its runs have no scores); each
    with a note on what was measured."""

    def get(family: str, sampler: str) -> Cell | None:
        return cells.get((family, sampler))

    def pairs(specs: list[tuple[str, tuple[str, str], tuple[str, str], list[str]]]) -> list[Comparison]:
        out = []
        for label, (fa, sa), (fb, sb), metrics in specs:
            a, b = get(fa, sa), get(fb, sb)
            if a is not None and b is not None:
                out += [Comparison(label, a, b, m) for m in metrics if m in a.values and m in b.values]
        return out

    q = ["toy_fd", "acc_joint"]
    m1n2, m1n4, m2n2, m2n4 = "TMD M=1 N=2", "TMD M=1 N=4", "TMD M=2 N=2", "TMD M=2 N=4"
    found = [
        ("1. At matched effective NFE, TMD beats DMD2-v", pairs([
            ("TMD M=1 N=2 (NFE 1.17) vs DMD2-v 1 step (NFE 1)", ("TMD", m1n2), ("DMD2-v 1 step", "few-step M=1"), q),
            ("TMD M=2 N=2 (NFE 2.33) vs DMD2-v 2 steps (NFE 2)", ("TMD", m2n2), ("DMD2-v 2 steps", "few-step M=2"),
             q),
            ("TMD M=2 N=4 (NFE 3) vs DMD2-v 3 steps (NFE 3)", ("TMD", m2n4), ("DMD2-v 3 steps", "few-step M=3"), q),
        ]), "TMD's M = 1 rows sample the M = 2-trained student with one outer step (the paper trains M = 1 "
            "separately, for 3x the iterations). As in the paper, the one-step DMD2-v starts from a KD warm-up on "
            "the teacher's noise -> sample pairs; DMD2-v 2 and 3 steps and TMD start without one."),
        ("2. TM-MeanFlow beats plain TM as Stage-1 initialisation", pairs([
            ("Stage 1 alone, M=2 N=2", ("Stage 1, TM-MF", m2n2), ("Stage 1, plain TM", m2n2), q),
            ("Stage 1 alone, M=1 N=2", ("Stage 1, TM-MF", m1n2), ("Stage 1, plain TM", m1n2), q),
            ("after Stage 2, M=2 N=2", ("TMD", m2n2), ("TMD, Stage 1 plain TM", m2n2), q),
        ]), "Both Stage-1 variants train for the same steps; the distilled rows differ only in their init."),
        ("3. Flow-head rollout beats no rollout", pairs([
            ("M=2 N=2", ("TMD", m2n2), ("TMD, no rollout", m2n2), q),
            ("M=1 N=2", ("TMD", m1n2), ("TMD, no rollout", m1n2), q),
        ]), "No rollout: the inner steps are detached, so the VSD and GAN gradients reach only the last inner step."),
        ("4. Quality rises with N (inner steps) at a known cost", pairs([
            ("TMD M=1: N=4 vs N=2", ("TMD", m1n4), ("TMD", m1n2), q),
            ("TMD M=2: N=4 vs N=2", ("TMD", m2n4), ("TMD", m2n2), q),
        ]), "Cost: each extra inner step runs the H-block head only (+H/L = 1/6 NFE per outer step on the toy; the "
            "seconds column shows the wall-clock price). H is not varied in this study: the toy has L = 6 blocks "
            "and H = 1; the claim about H is not tested here."),
        ("5. Without the t_dmd shift, DMD collapses modes", pairs([
            ("M=2 N=2, shift 5 vs none", ("TMD", m2n2), ("TMD, no t_dmd shift", m2n2), ["coverage", "toy_fd"]),
            ("M=1 N=2, shift 5 vs none", ("TMD", m1n2), ("TMD, no t_dmd shift", m1n2), ["coverage", "toy_fd"]),
        ]), "Coverage = within-caption spread of start position and size in samples / in real videos (1 = the "
            "data's spread, 0 = one mode per caption); see `tmd_lightning/metrics/coverage.py`."),
    ]
    return found


def lora_section(cells: dict[tuple[str, str], Cell], minutes: dict[str, float], runs: list[Run]) -> list[str]:
    """LoRA mode against full copies (not a paper claim: the framework's memory option), quality and run time."""
    full, lora = "TMD", "TMD, LoRA fake score"
    rows = [(s, cells[(full, s)], cells[(lora, s)]) for s in ("TMD M=1 N=2", "TMD M=2 N=2")
            if (full, s) in cells and (lora, s) in cells]
    if not rows:
        return []

    def run_minutes(family: str) -> str:
        values = [minutes[r.name] for r in runs if r.family == family and r.name in minutes]
        return f"{mean(values):.1f}" if values else "n/a"

    out = ["### LoRA mode (the framework's memory option, not a paper claim)", "",
           "The fake score as a rank-16 LoRA adapter on the frozen teacher (`stage.lora.fake_score=true`) against a "
           "full fake-score copy, same seeds and budget:", "",
           markdown_table(["sampler", "metric", "full fake score", "LoRA fake score"],
                          [[sampler, name, a.text(key, fmt), b.text(key, fmt)] for sampler, a, b in rows
                           for key, name, fmt, _ in METRICS if key in ("acc_joint", "toy_fd", "coverage")])]
    out += ["", f"Mean minutes per training run: full {run_minutes(full)}, LoRA {run_minutes(lora)} (runs share the "
            "machine with one other run, so minutes are indicative; `python benchmarks/lora.py` measures speed "
            "and memory directly).", ""]
    return out


def kd_section(cells: dict[tuple[str, str], Cell]) -> list[str]:
    """The one-step DMD2-v against its own KD warm-up (not a paper claim: what distribution matching adds to the
    regression onto the teacher's samples it starts from)."""
    sampler = "few-step M=1"
    kd, dmd2 = cells.get((KD_FAMILY, sampler)), cells.get(("DMD2-v 1 step", sampler))
    if kd is None or dmd2 is None:
        return []
    return ["### What DMD2-v adds to its KD warm-up (one step; not a paper claim)", "",
            "Each seed's one-step DMD2-v starts from that seed's KD warm-up student (regressed onto the teacher's "
            "CFG-5 samples from the same noise, the paper's Table 7); the warm-ups alone, sampled with one step:", "",
            markdown_table(["metric", KD_FAMILY, "DMD2-v 1 step"],
                           [[name, kd.text(key, fmt), dmd2.text(key, fmt)] for key, name, fmt, _ in METRICS
                            if key in kd.values and key in dmd2.values]), ""]


@dataclass
class Curve:
    """One family's toy-eval curve: the mean over its seeds at each step that every seed evaluated."""

    family: str
    unit: str  # what a step counts: "iterations" (Stage 2) or "steps" (Stage 1)
    seeds: int
    steps: list[int]
    values: dict[str, list[float]]  # toy_eval.csv column -> mean over seeds, one per step


def read_toy_eval(path: Path) -> dict[int, dict[str, float]]:
    """step -> metrics of one run's `toy_eval.csv` ({} when there is none). A resumed run may have evaluated a step
    twice: its last row counts."""
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {int(float(row["step"])): {k: float(v) for k, v in row.items() if k not in (None, "step") and v}
                for row in csv.DictReader(fh)}


def family_curve(family: str, runs: list[Run], out: Path) -> Curve | None:
    """The mean curve of a family's runs that wrote a toy_eval.csv, at the steps all of them evaluated."""
    mine = [r for r in runs if r.family == family]
    logs = [log for log in (read_toy_eval(run_record(out, r.name, "toy_eval.csv")) for r in mine) if log]
    if not logs:
        return None
    keys = [key for key, _, _ in CURVE_METRICS]
    common = set.intersection(*(set(log) for log in logs))
    steps = sorted(s for s in common if all(k in log[s] for log in logs for k in keys))
    if not steps:
        return None
    unit = "iterations" if mine[0].experiment in STAGE2_EXPERIMENTS else "steps"
    return Curve(family, unit, len(logs), steps, {k: [mean(log[s][k] for log in logs) for s in steps] for k in keys})


def training_curves(runs: list[Run], out: Path) -> list[Curve]:
    """Stage 1 TM-MF's and every Stage-2 family's curve, in run order; families without curves are left out."""
    families = dict.fromkeys(r.family for r in runs if r.experiment in STAGE2_EXPERIMENTS or r.family == STAGE1_CURVE)
    return [c for c in (family_curve(f, runs, out) for f in families) if c is not None]


def plot_curves(curves: list[Curve], path: Path) -> Path:
    """Joint accuracy and toy-FD against step, one line per family (Stage 1 dashed: its steps are optimizer steps,
    Stage 2's are iterations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, _, label) in zip(axes, CURVE_METRICS, strict=True):
        for c in curves:
            ax.plot(c.steps, c.values[key], marker="o", ms=3, lw=1, ls="--" if c.unit == "steps" else "-",
                    label=f"{c.family} ({c.seeds} seed{'s' if c.seeds > 1 else ''})")
        ax.set_xlabel("Stage-2 iteration (Stage 1: optimizer step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _save(fig, axes, path)


def _save(fig: Any, axes: Any, path: Path) -> Path:
    """One legend (on the first panel), tight layout, PNG at 130 dpi; closes the figure."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def joint_step(c: Curve) -> tuple[float, float]:
    """The last two evaluations' change in joint accuracy and twice its binomial sampling error (each evaluation
    scores CURVE_VIDEOS videos per seed, treated as independent draws: a conservative error, since both evaluations
    reuse the same captions and noise seeds)."""
    p1, p2 = c.values["toy/acc_joint"][-2:]
    n = CURVE_VIDEOS * c.seeds
    return p2 - p1, 2 * ((p1 * (1 - p1) + p2 * (1 - p2)) / n) ** 0.5


def curve_flat(c: Curve) -> bool:
    """Whether joint accuracy moved less than twice its sampling error between the last two evaluations."""
    change, error = joint_step(c)
    return abs(change) <= error


def curve_line(c: Curve) -> str:
    """The last two evaluations' means of one family, so a reader sees whether its curve has flattened."""
    if len(c.steps) < 2:
        values = ", ".join(f"{name} {c.values[key][-1]:.3f}" for key, name, _ in CURVE_METRICS)
        return f"- {c.family}: {values} at {c.unit[:-1]} {c.steps[-1]} (one evaluation)"
    values = ", ".join(f"{name} {c.values[key][-2]:.3f} -> {c.values[key][-1]:.3f}" for key, name, _ in CURVE_METRICS)
    change, error = joint_step(c)
    judged = "flat" if curve_flat(c) else "still moving"
    return (f"- {c.family}: {values} over the last {c.steps[-1] - c.steps[-2]} {c.unit} ({c.steps[-2]} -> "
            f"{c.steps[-1]}): **{judged}** (joint {change:+.3f}, twice its sampling error {error:.3f})")


def curves_verdict(curves: list[Curve]) -> str:
    """One sentence on whether the budgets were long enough, from every family evaluated at least twice."""
    moving = [c.family for c in curves if len(c.steps) >= 2 and not curve_flat(c)]
    if not moving:
        return "Every curve's joint accuracy is flat within its sampling error over the last evaluation interval."
    return (f"Still moving over the last evaluation interval (joint accuracy changed by more than twice its "
            f"sampling error): {'; '.join(moving)}. For these the budget is not shown to be long enough; their "
            f"final scores may sit on an upswing or a dip of the curve.")


def curves_section(runs: list[Run], out: Path) -> list[str]:
    """`training_curves.png` and the last two evaluations per family; nothing when no run left a toy_eval.csv (e.g.
    `--report-only` on runs from before the curves)."""
    curves = training_curves(runs, out)
    if not curves:
        (out / "training_curves.png").unlink(missing_ok=True)  # an earlier figure would show runs no longer reported
        return []
    figure = plot_curves(curves, out / "training_curves.png")
    return ["## Training curves", "",
            "Each run's toy evaluation during training (`runs/<run>/toy_eval.csv`: the 48 toy captions x 2 seeds with "
            "the run's own sampler; a quarter of the budget apart), the mean over training seeds at the steps every "
            "seed evaluated. A curve counts as flat where joint accuracy moved by no more than twice its binomial "
            f"sampling error ({CURVE_VIDEOS} videos per seed) between the last two evaluations.", "",
            f"![training curves]({figure.name})", "", *map(curve_line, curves), "", curves_verdict(curves), ""]


def sample_sources(families: list[str], runs: list[Run], out: Path) -> list[tuple[str, str]]:
    """(row label prefix, run name) of the sample grid: the teacher, then per family its lowest training seed that
    left samples."""
    sources = [(TEACHER_REF, TEACHER_REF)] if samples_file(out, TEACHER_REF).is_file() else []
    for family in families:
        seeded = sorted((r for r in runs if r.family == family and samples_file(out, r.name).is_file()),
                        key=lambda r: r.seed)
        if family != TEACHER_REF and seeded:
            sources.append((f"{family} (training seed {seeded[0].seed})", seeded[0].name))
    return sources


def samples_section(families: list[str], runs: list[Run], out: Path) -> list[str]:
    """`samples.gif` (one row per model and sampler, one column per grid caption) and its middle frame
    `samples.png`; nothing when no model left samples (`scores/<run>.samples.npz`)."""
    from PIL import Image

    from tmd_lightning.data.toy_world import FPS
    from tmd_lightning.media import gif_grid
    from tmd_lightning.study.scores import read_samples

    labels, videos, prompts, seed = [], [], None, None
    for prefix, name in sample_sources(families, runs, out):
        mine, mine_seed, rows = read_samples(samples_file(out, name))
        if prompts is None:
            prompts, seed = mine, mine_seed
        if (mine, mine_seed) != (prompts, seed):  # drawn for another grid: left out, and said so
            print(f"samples of {name} are for other prompts or seeds; left out of the grid", flush=True)
            continue
        for label, v in rows:
            labels.append(f"{prefix}, {label}")
            videos += list(v)
    if not videos:
        for stale in ("samples.gif", "samples.png"):
            (out / stale).unlink(missing_ok=True)
        return []
    gif = gif_grid(out / "samples.gif", videos, labels, prompts, fps=FPS, header_lines=3, label_width=240)
    with Image.open(gif) as image:
        image.seek(image.n_frames // 2)
        image.convert("RGB").save(out / "samples.png")
    return ["## Samples", "", "![sample grid, middle frame](samples.png)", "",
            f"The middle frame of `samples.gif`: one row per model and sampler (the teacher and each model above at "
            f"its lowest training seed), one column per caption, sampling seed {seed}. The videos are kept in "
            "`scores/<run>.samples.npz`.", ""]


def plot_series(cells: list[Cell]) -> dict[str, list[Cell]]:
    """The plot's lines: one per family, the teacher's few-step samplers split into with and without CFG (one line
    through both would join points of different kinds, e.g. Euler 1 x CFG and Euler 2 without CFG at NFE 2)."""
    series: dict[str, list[Cell]] = {}
    for c in cells:
        name = c.family
        if c.family == TEACHER_REF:
            name = f"{TEACHER_REF}, no CFG" if "no CFG" in c.sampler else f"{TEACHER_REF}, with CFG"
        series.setdefault(name, []).append(c)
    return series


def plot(cells: dict[tuple[str, str], Cell], path: Path) -> Path:
    """toy-FD and joint accuracy against effective NFE (log x), seed range as error bars; the teacher's 50x2 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    teacher = [c for c in cells.values() if c.family == TEACHER_REF]
    ref = max(teacher, key=lambda c: c.mean("effective_nfe")) if teacher else None
    for ax, key, label in ((axes[0], "toy_fd", "toy-FD (lower is better)"),
                           (axes[1], "acc_joint", "joint accuracy (higher is better)")):
        if ref is not None and key in ref.values:
            ax.axhline(ref.mean(key), color="k", ls=":", lw=1, label=f"teacher {ref.sampler}")
        for family, members in plot_series([c for c in cells.values() if c is not ref]).items():
            mine = sorted((c for c in members if key in c.values), key=lambda c: c.mean("effective_nfe"))
            if not mine:
                continue
            ax.errorbar([c.mean("effective_nfe") for c in mine], [c.mean(key) for c in mine],
                        yerr=[[c.mean(key) - min(c.values[key]) for c in mine],
                              [max(c.values[key]) - c.mean(key) for c in mine]],
                        marker="o", ms=4, capsize=3, lw=1, label=family)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator([1, 1.5, 2, 3, 4, 6, 8]))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("effective NFE")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _save(fig, axes, path)


def write_report(rows: list[dict[str, Any]], runs: list[Run], out: Path, budget: Budget, quick: bool,
                 seeds: list[int], command: str, wall_minutes: float | None = None,
                 train_minutes: dict[str, float] | None = None) -> Path:
    """REPORT.md, results.csv, quality_vs_nfe.png, samples.gif/png (when models left samples) and (when the runs left
    toy_eval.csv files) training_curves.png in `out`; returns the report's path. Rows are taken in the study's run
    order, so the page does not depend on which runs this invocation scored and which it read from the cache."""
    order = {r.name: i for i, r in enumerate(runs)}
    rows = sorted(rows, key=lambda r: order.get(r["run"], -1))  # the teacher (not a run) first
    cells = aggregate(rows)
    write_csv(rows, out / "results.csv")
    figure = plot(cells, out / "quality_vs_nfe.png")
    teacher = [c for c in cells.values() if c.family == TEACHER_REF]
    reference = max(teacher, key=lambda c: c.mean("effective_nfe")) if teacher else None
    ref_seconds = reference.mean("seconds_per_video") if reference else None
    # the teacher's samplers, then the students from the cheapest: the table reads as quality against cost
    students = [c for c in cells.values() if c.family in ("TMD", KD_FAMILY) or c.family.startswith("DMD2-v")]
    headline = teacher + sorted(students, key=lambda c: (c.mean("effective_nfe"), c.family))
    ablations = [c for c in cells.values() if c not in headline]
    videos = budget.eval_prompts * len(budget.eval_seeds)
    lines = [
        "# TMD on the toy world: the paper's claims, checked" + (" (quick smoke run: numbers mean nothing)"
                                                                  if quick else ""),
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()} ({platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads split between parallel runs)"
        + (f"; {wall_minutes:.0f} minutes for this invocation" if wall_minutes is not None else
           "; this page rebuilt from the cached scores with `--report-only`") + ".",
        "",
        f"Budget per seed: Stage 1 {budget.stage1_steps} steps (batch 32); Stage 2 {budget.distill_iterations} "
        f"iterations (batch 16, a student step every 5th); the one-step DMD2-v's KD warm-up {budget.kd_steps} steps "
        f"(batch 32) on the teacher's pairs; training seeds {', '.join(map(str, seeds))}. Every model "
        f"samples the same {budget.eval_prompts} prompts x {len(budget.eval_seeds)} seeds = {videos} videos per row; "
        "toy-FD against 192 held-out real videos. Values are the mean over training seeds ± half their range. "
        "Seconds per video are wall-clock on this machine for a batch of 64 (noisy, shared machine).",
        "",
        "## Verdicts",
        "",
    ]
    for title, comps, note in claims(cells):
        state = verdict(comps) if comps else "waiting for its runs (none scored with the current recipe)"
        lines += [f"### {title}: {state}", "", *(c.line() for c in comps), *([""] if comps else []), note, ""]
    lines += lora_section(cells, train_minutes or {}, runs)
    lines += kd_section(cells)
    lines += ["## Quality against cost: teacher, TMD, DMD2-v (and its KD warm-up)", "",
              table(headline, ref_seconds), "", f"![quality against effective NFE]({figure.name})", ""]
    lines += samples_section(list(dict.fromkeys(c.family for c in headline)), runs, out)
    lines += ["## Ablations", "", table(ablations, ref_seconds), ""]
    lines += curves_section(runs, out)
    if train_minutes:
        total = sum(train_minutes.values())
        lines += ["## Training cost", "", f"{len(train_minutes)} runs, {total:.0f} minutes of run time in all "
                  "(runs overlap when `--jobs` > 1):", "",
                  markdown_table(["run", "minutes"], [[k, f"{v:.1f}"] for k, v in train_minutes.items()], left=1), ""]
    lines += ["## Files", "", "- `results.csv`: every run x sampler with every metric (one row per training seed).",
              "- `scores/<run>.json`: the cached scores, with `scores/<run>.done.json` (training time) and "
              "`scores/<run>.toy_eval.csv` (training curve) copied from the run's folder and "
              "`scores/<run>.samples.npz` (the sample grid's videos), so a later sitting on another machine keeps "
              "them; `runs/<run>/` (not in git): each run's folder with its config, logs, checkpoints and exported "
              "student.", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    return report

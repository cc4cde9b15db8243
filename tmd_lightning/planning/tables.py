"""The plan as Markdown: the setting, the parameter table, the per-GPU memory table and the verdict table, joined
into the document `python -m tmd_lightning.plan` prints and writes to `plan.md`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tmd_lightning.planning.counts import Counts
from tmd_lightning.planning.run_setup import Setup
from tmd_lightning.planning.shapes import Sizes
from tmd_lightning.planning.units import GIB
from tmd_lightning.sampling import effective_nfe

COLUMNS_NOTE = ("Columns: stage and mode (full; LoRA fake = stage.lora.fake_score; LoRA both = + stage.lora."
                "student). Totals: the static rows plus the weight copies and activations of the stage's "
                "largest iteration kind, at the end of its forward (last step's gradients still allocated). "
                "Formulas and what they are checked against: docs/plan.md.")


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, for the tables."""
    return f"{n / GIB:.1f}"


def params_table(c: dict[str, Counts], cfg: DictConfig, setup: Setup) -> str:
    """Markdown: every network with its role, parameter count, LoRA adapter size and how it is held."""
    te_dtype = str(cfg.model.text_encoder.get("dtype", "float32"))
    train = f"{'float32' if setup.precision.param == 4 else 'bfloat16'} + grads + AdamW"
    rows = [("teacher", "frozen", c["teacher"], str(cfg.frozen_dtype)),
            ("TMD student", "trainable", c["student"], train),
            ("fake score", "trainable (teacher copy)", c["teacher"], train),
            ("DMD2-v student", "trainable (teacher copy)", c["teacher"], train),
            ("discriminator", "trainable", c["discriminator"], train),
            ("text encoder", "frozen", c["text_encoder"], te_dtype),
            ("VAE", "frozen", c["codec"], "float32")]
    lines = [f"| network | role | parameters | LoRA adapter (r={cfg.lora.rank}) | held as |", "|---|---|---:|---:|---|"]
    for name, role, n, held in rows:
        lora = f"{n.lora:,}" if n.lora else ""
        lines.append(f"| {name} | {role} | {n.params:,} | {lora} | {held} |")
    return "\n".join(lines)


def memory_table(mem: dict[tuple[str, str], dict[str, float]], limit: float) -> str:
    """Markdown: one column per (stage, mode), one row per memory item, and whether the totals fit `limit`."""
    cols = list(mem)
    head = "| per GPU, GiB | " + " | ".join(f"{s} {m}" for s, m in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for row in next(iter(mem.values())):
        lines.append(f"| {row} | " + " | ".join(gib(mem[col][row]) for col in cols) + " |")
    fits = [("yes" if mem[col]["total, no checkpointing"] <= limit else "no") + " / "
            + ("yes" if mem[col]["total, checkpointing"] <= limit else "no") for col in cols]
    lines.append(f"| fits {limit / GIB:g} GiB (no ckpt / ckpt) | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def summary_lines(cfg: DictConfig, s: Sizes, setup: Setup) -> list[str]:
    """The plan's setting: model, token count, strategy, the samplers' effective NFE and the paper's recipe."""
    L, H, M, N = s.num_layers, int(cfg.tmd.H), int(cfg.tmd.M), int(cfg.tmd.N)
    tmd, teacher = effective_nfe(M, N, H, L), effective_nfe(50, cfg=True)
    lines = [f"model {cfg.model.name}: L = {L}, D = {s.dim}, F = {s.ffn}, H = {H}",
             f"video {cfg.video.num_frames} x {cfg.video.height} x {cfg.video.width} -> latents "
             f"{' x '.join(map(str, s.latent))} -> tokens {' x '.join(map(str, s.grid))} = {s.tokens:,}; "
             f"text {s.text_len} tokens; micro-batch {cfg.micro_batch} video(s) per GPU",
             f"strategy {setup.strategy} on {setup.world} GPU(s), precision {cfg.trainer.get('precision')}, "
             f"frozen teacher {cfg.frozen_dtype}",
             f"sampling: TMD M={M} N={N} (H={H} of L={L}) effective NFE {tmd:.2f}; teacher 50 steps x 2 (CFG) "
             f"NFE {teacher:g}; {teacher / tmd:.0f}x fewer block evaluations"]
    recipe = cfg.model.get("recipe")
    if recipe is not None:
        lines.append(f"paper recipe: adapt_head AdamW lr {recipe.adapt_head.lr:g}, loss_c {recipe.adapt_head.loss_c:g}"
                     f", batch {recipe.adapt_head.global_batch}, {recipe.adapt_head.iterations} iterations; distill lr "
                     f"{recipe.distill.lr:g}, {recipe.distill.iterations} iterations (M >= 2), "
                     f"{recipe.distill.iterations_m1} (M = 1)")
    return lines


def verdict_table(rows: list[dict[str, Any]], cfg: DictConfig, setup: Setup, checkpointing: bool) -> str:
    """Markdown: one row per column, one verdict per GPU size (fits, with the spare or missing GiB)."""
    gpus = list(cfg.verdict_gpus)
    head = "| stage, mode | per GPU | " + " | ".join(f"{g.name} ({g.gib:g} GiB)" for g in gpus) + " |"
    lines = [head, "|---|---:|" + "---|" * len(gpus)]
    for r in rows:
        cells = []
        for g in gpus:
            spare = float(g.gib) - r["need"] / GIB
            cell = f"fits ({spare:.1f} GiB spare)" if spare >= 0 else f"does not fit ({-spare:.1f} GiB over)"
            cells.append(cell if r["supported"] else f"{cell}; LoRA is refused under FSDP2 (trainer=ddp)")
        lines.append(f"| {r['stage']} {r['mode']} | {gib(r['need'])} GiB | " + " | ".join(cells) + " |")
    where = f"{setup.strategy} on {setup.world} GPU(s)"
    lines.append("")
    lines.append(f"Verdict ({where}, micro-batch {cfg.micro_batch}, activation checkpointing "
                 f"{'on' if checkpointing else 'off'}, encoders {'on' if cfg.encoders_on_gpu else 'off'} the GPU):")
    for g in gpus:
        ok = [f"{r['stage']} {r['mode']}" for r in rows if r["supported"] and r["fits"][str(g.name)]]
        too_big = [f"{r['stage']} {r['mode']}" for r in rows if r["supported"] and not r["fits"][str(g.name)]]
        text = f"fits {', '.join(ok)}" if ok else "nothing fits"
        lines.append(f"- {g.name}: {text}" + (f"; does not fit {', '.join(too_big)}" if ok and too_big else ""))
    return "\n".join(lines)


def report(cfg: DictConfig, result: dict[str, Any]) -> str:
    """The whole Markdown document of a plan (`planner.plan`'s result): title, setting, the three tables and a note
    on what the columns and totals mean."""
    limit = float(cfg.gpu_memory_gib) * GIB
    title = f"{cfg.model.name}" + (f", experiment={cfg.experiment}" if cfg.get("experiment") else "")
    checkpointing = bool(cfg.get("activation_checkpointing", True))
    return "\n".join([f"# Memory plan: {title}", "",
                      *[f"- {line}" for line in summary_lines(cfg, result["sizes"], result["setup"])], "",
                      "## Parameters", "", params_table(result["counts"], cfg, result["setup"]), "",
                      "## Per-GPU memory", "", memory_table(result["memory"], limit), "",
                      "## Verdict per GPU size", "",
                      verdict_table(result["verdicts"], cfg, result["setup"], checkpointing), "",
                      COLUMNS_NOTE])

"""What each study run trains with, so that a finished run (or its cached scores) made with another recipe is not
mistaken for a current one.

A run's recipe is its composed config (model, TMD shape, stage, data, trainer and seed), unresolved so that it
holds no machine's paths, plus a digest of the teacher's weights. `train` records it in the run's `done.json`, which
is kept beside the run's scores; `retire_stale` sets aside every run whose recorded recipe differs from today's (or
that has none: trained before recipes were recorded), and every run that starts from one of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tmd_lightning.study.runs import (
    KEPT_RECORDS,
    RUNS,
    Run,
    kept_record,
    run_dir,
    run_record,
    samples_file,
    score_file,
)

RECIPE_SECTIONS = ("model", "tmd", "stage", "data", "trainer", "seed")  # what a run's samples depend on
KD_PAIRS_IGNORED = ("hydra", "paths", "output", "task_name")  # the kd_pairs entry: all but where it writes
# model keys only the students read: the KD pairs are the teacher's samples, so a change to these leaves them valid
STUDENT_ONLY_MODEL_KEYS = ("student_grid_gamma", "head_blocks", "disc_blocks", "disc_width")


@functools.lru_cache(maxsize=4)
def weights_digest(folder: str) -> str:
    """SHA-256 (first 16 hex digits) of a diffusers folder's weight files: a retrained teacher changes every run."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as `{dotted.key: leaf}`, so two recipes can be compared key by key."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()} or {
            prefix[:-1]: []}
    return {prefix[:-1]: tree}


def run_recipe(run: Run) -> dict[str, Any]:
    """The run's recipe, flattened: its composed config (experiment + overrides + seed, `{runs}` as written) without
    the parts that do not change what it trains (paths, logging, callbacks but an enabled EMA, whose weights are
    the ones exported and scored; for the KD pairs, the model keys only students read), and the teacher's weights
    digest."""
    from hydra import compose, initialize_config_dir

    from tmd_lightning.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    # `{runs}` would read as a dict to Hydra's override parser; a fixed stand-in keeps recipes machine-independent
    overrides = [o.replace(RUNS, "/study/runs") for o in run.overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        if run.entry == "kd_pairs":
            cfg = compose("kd_pairs", overrides=overrides)
            tree = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in KD_PAIRS_IGNORED}
            tree["model"] = {k: v for k, v in tree["model"].items() if k not in STUDENT_ONLY_MODEL_KEYS}
        else:
            cfg = compose("fit", overrides=[f"experiment={run.experiment}", f"seed={run.seed}", *overrides])
            tree = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k in RECIPE_SECTIONS}
            ema = OmegaConf.select(cfg, "callbacks.ema")
            if ema is not None and ema.get("enabled", True):  # the one callback that decides the exported weights
                tree["callbacks"] = {"ema": OmegaConf.to_container(ema, resolve=False)}
        pretrained = OmegaConf.select(cfg, "model.pretrained")
    recipe = flatten(tree)
    recipe["teacher_weights"] = weights_digest(str(pretrained)) if pretrained else None
    return recipe


def recorded_recipe(out: Path, name: str) -> dict[str, Any] | None:
    """The recipe a finished run recorded (its `done.json`, else the copy kept beside its scores); None if none."""
    record = run_record(out, name, "done.json")
    return json.loads(record.read_text()).get("recipe") if record.is_file() else None


def has_record(out: Path, name: str) -> bool:
    """Whether anything of the run is here: its folder or its cached scores."""
    return run_dir(out, name).exists() or score_file(out, name).is_file()


def differences(old: dict[str, Any] | None, new: dict[str, Any], most: int = 4) -> str:
    """The keys two recipes disagree on, for the log (old -> new)."""
    if old is None:
        return "none recorded: trained before recipes were recorded"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def retire_stale(study: list[Run], out: Path, set_aside: bool = True) -> list[str]:
    """Every run of the study trained with another recipe than today's, and every run that depends on one, in the
    study's order. With `set_aside` its folder moves to `runs/.stale/`, its cached scores and kept records to
    `scores/.stale/` (nothing is deleted), so it trains and is scored again."""
    stale: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for run in study:  # dependencies come first in the study's order
        if not has_record(out, run.name):
            continue
        upstream = [d for d in run.depends if d in stale]
        if upstream:
            why = f"it starts from {', '.join(upstream)}, which trains again"
        elif not (run_dir(out, run.name) / "done.json").is_file() and not score_file(out, run.name).is_file():
            continue  # interrupted here (or still training): it resumes from its last.ckpt, its recipe is recorded then
        else:
            old, new = recorded_recipe(out, run.name), run_recipe(run)
            if old == new:
                continue
            why = differences(old, new)
        stale.append(run.name)
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: recipe changed ({why})"
              + ("; set aside, trains again" if set_aside else "; left out of the report"), flush=True)
        if not set_aside:
            continue
        if run_dir(out, run.name).exists():
            (out / "runs" / ".stale").mkdir(parents=True, exist_ok=True)
            shutil.move(run_dir(out, run.name), out / "runs" / ".stale" / f"{run.name}-{stamp}")
        for kept in (score_file(out, run.name), samples_file(out, run.name),
                     *(kept_record(out, run.name, f) for f in KEPT_RECORDS)):
            if kept.is_file():
                (out / "scores" / ".stale").mkdir(parents=True, exist_ok=True)
                shutil.move(kept, out / "scores" / ".stale" / f"{stamp}-{kept.name}")
    return stale

"""Scores of the toy study: every run's final student sampled on the same prompts and seeds, cached per run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmd_lightning.evaluation.generate import generate_videos, load_model
from tmd_lightning.evaluation.scores import ToyReference, toy_accuracy, toy_fd
from tmd_lightning.metrics.coverage import mode_coverage
from tmd_lightning.study.recipes import weights_digest
from tmd_lightning.study.runs import (
    KEPT_RECORDS,
    Budget,
    Run,
    is_carried,
    is_done,
    kept_record,
    project_root,
    run_dir,
    samples_file,
    score_file,
    student_export,
)

EXTRA_TEACHER_SAMPLERS = ({"steps": 3, "cfg": 1.0},)  # beside `evaluate`'s teacher rows: Euler 3 without CFG


def teacher_samplers(budget: Budget, cfg: Any) -> list[dict[str, Any]]:
    """The teacher's rows: `evaluate`'s (the model's guidance resolved), the first at the budget's step count, and
    EXTRA_TEACHER_SAMPLERS."""
    from omegaconf import OmegaConf

    (teacher,) = [m for m in cfg.models if m.label == "teacher"]
    rows = [dict(r) for r in OmegaConf.to_container(teacher.samplers, resolve=True)]
    return [{**rows[0], "steps": budget.teacher_steps}, *rows[1:], *map(dict, EXTRA_TEACHER_SAMPLERS)]


BATCH = 64  # videos sampled per call


def quality(videos: torch.Tensor, captions: list[str], reference: ToyReference) -> dict[str, float]:
    """Toy accuracies, toy-FD against the reference and mode coverage of one sampler's videos."""
    return {**toy_accuracy(videos, captions), "toy_fd": toy_fd(videos, reference.stats),
            **mode_coverage(videos, captions, reference.videos, reference.captions)}


def load_stage(path: Path, cfg: Any) -> Any:
    """A model to sample (a student export or the teacher's folder) with the toy's codec and text encoder."""
    from hydra.utils import instantiate

    codec, text_encoder = instantiate(cfg.model.codec), instantiate(cfg.model.text_encoder)
    return load_model(path, codec, text_encoder, cfg.model.negative_prompt).eval()


GRID_PROMPTS = 8  # columns of the report's sample grid


def grid_prompts(count: int = GRID_PROMPTS) -> list[str]:
    """The sample grid's captions: every colour, shape and direction about equally often, so a row shows at a glance
    which of the three a model gets wrong."""
    from tmd_lightning.data.toy_world import CAPTION_TEMPLATE, COLOURS, DIRECTIONS, SHAPES

    colours, directions = list(COLOURS), list(DIRECTIONS)
    return [CAPTION_TEMPLATE.format(colour=colours[k % len(colours)], shape=SHAPES[k % len(SHAPES)],
                                    direction=directions[(k + k // len(colours)) % len(directions)])
            for k in range(count)]


def write_samples(path: Path, samplers: list[dict[str, Any]], budget: Budget, cfg: Any, target: Path) -> Path:
    """The grid prompts' videos (first sampling seed) of every sampler of one model, for the report's sample grid:
    `target` (.npz) holds `prompts`, `seed`, `labels` and the uint8 videos (prompts, frames, H, W, 3) per sampler as
    `video_<k>` in the order of `labels`."""
    stage = load_stage(path, cfg)
    prompts, seed = grid_prompts(), budget.eval_seeds[0]
    shape = (cfg.num_frames, cfg.height, cfg.width)
    labels, videos = [], {}
    for k, opts in enumerate(samplers):
        videos[f"video_{k}"] = generate_videos(stage, [(p, seed) for p in prompts], shape, BATCH, **opts)[0].numpy()
        labels.append(stage.sampler.with_options(**opts).label())
    np.savez_compressed(target, prompts=np.array(prompts), seed=np.array(seed), labels=np.array(labels), **videos)
    return target


def read_samples(path: Path) -> tuple[list[str], int, list[tuple[str, np.ndarray]]]:
    """`write_samples`' file as (prompts, seed, [(sampler label, videos)])."""
    with np.load(path) as f:
        labels = [str(x) for x in f["labels"]]
        return ([str(x) for x in f["prompts"]], int(f["seed"]),
                [(label, f[f"video_{k}"]) for k, label in enumerate(labels)])


def score_model(path: Path, samplers: list[dict[str, Any]], budget: Budget, cfg: Any,
                reference: ToyReference) -> list[dict[str, Any]]:
    """Samples one model with each sampler on the budget's prompts and seeds; scores and times it.

    Each sampler runs once untimed on one batch first, so the timing excludes one-off warm-up costs.
    """
    from tmd_lightning.data.toy_world import all_captions

    stage = load_stage(path, cfg)
    prompts = all_captions()[:: max(1, 48 // budget.eval_prompts)][: budget.eval_prompts]
    pairs = [(p, s) for p in prompts for s in budget.eval_seeds]
    shape = (cfg.num_frames, cfg.height, cfg.width)
    rows = []
    for opts in samplers:
        generate_videos(stage, pairs[:BATCH], shape, BATCH, **opts)  # warm-up
        videos, seconds = generate_videos(stage, pairs, shape, BATCH, **opts)
        label = stage.sampler.with_options(**opts).label()
        rows.append({"sampler": label, **opts, "effective_nfe": stage.sampler_nfe(**opts),
                     "seconds_per_video": seconds, **quality(videos, [p for p, _ in pairs], reference)})
    return rows


def evaluation_config(out: Path) -> Any:
    """The `evaluate` config (toy model, held-out reference videos) composed without Hydra's app runner."""
    from hydra import compose, initialize_config_dir

    from tmd_lightning.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.root_dir={project_root()}", f"paths.output_dir={out}"])


def weights_record(cache: Path) -> Path:
    """Where the teacher's score records the digest of the weights it was made with (beside `scores/teacher.json`)."""
    return cache.with_name(f"{cache.stem}.weights")


def cached_rows(cache: Path, samplers: list[dict[str, Any]], done: Path | None = None,
                weights: str | None = None) -> list[dict[str, Any]] | None:
    """A model's cached score rows, or None when there are none or they are stale: scored with other samplers (e.g.
    before the model's guidance scale changed), before the run last finished (retrained since), or, for the teacher
    (`weights`: its weights' digest), with other teacher weights or none recorded."""
    if not cache.is_file():
        return None
    found = json.loads(cache.read_text())
    made_with = [{k: r.get(k) for k in s} for r, s in zip(found, samplers, strict=False)]
    if len(found) != len(samplers) or made_with != samplers:
        print(f"[{time.strftime('%H:%M:%S')}] {cache.name}: scored with other samplers; scoring again", flush=True)
        return None
    if done is not None and done.is_file() and done.stat().st_mtime > cache.stat().st_mtime:
        print(f"[{time.strftime('%H:%M:%S')}] {cache.name}: the run finished after it was scored; scoring again",
              flush=True)
        return None
    record = weights_record(cache)
    if weights is not None and (not record.is_file() or record.read_text().strip() != weights):
        print(f"[{time.strftime('%H:%M:%S')}] {cache.name}: scored with other teacher weights (or none recorded); "
              "scoring again", flush=True)
        return None
    return found


def score(runs: list[Run], out: Path, budget: Budget) -> list[dict[str, Any]]:
    """Rows for the teacher and every finished run with samplers (cached in `scores/<run>.json`); runs without
    samplers (the KD pairs) make data, not a model, and are not scored."""
    cfg, reference = evaluation_config(out), None  # composing is cheap; the reference videos load on first use
    rows: list[dict[str, Any]] = []
    scores = out / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    teacher = teacher_samplers(budget, cfg)
    todo = [("teacher", "teacher", 0, None, teacher)] + [
        (r.name, r.family, r.seed, student_export(out, r.name) if is_done(out, r.name) else None, list(r.samplers))
        for r in runs if r.samplers and (is_done(out, r.name) or is_carried(out, r.name))]
    for k, (name, family, seed, path, samplers) in enumerate(todo, 1):
        cache = score_file(out, name)
        weights = weights_digest(str(cfg.model.pretrained)) if name == "teacher" else None
        found = cached_rows(cache, samplers, None if path is None else run_dir(out, name) / "done.json", weights)
        if found is None and name != "teacher" and path is None:  # carried, scored with other samplers
            print(f"[{time.strftime('%H:%M:%S')}] {name}: left out (its cached scores are stale and its run is not "
                  f"here; delete {cache} to train it again)", flush=True)
            continue
        if path is not None:  # keep its time and curve beside its scores, for sittings without its folder
            for file in KEPT_RECORDS:
                if (run_dir(out, name) / file).is_file():
                    shutil.copyfile(run_dir(out, name) / file, kept_record(out, name, file))
        if found is None:
            if reference is None:
                reference = ToyReference.from_config(cfg)
            print(f"[{time.strftime('%H:%M:%S')}] score {name} ({k}/{len(todo)})", flush=True)
            found = score_model(path if path is not None else Path(cfg.model.pretrained), samplers, budget, cfg,
                                reference)
            cache.write_text(json.dumps(found, indent=1))
            if weights is not None:
                weights_record(cache).write_text(weights + "\n")
            samples_file(out, name).unlink(missing_ok=True)  # drawn from the model these scores replace
        model = path if path is not None else Path(cfg.model.pretrained) if name == "teacher" else None
        if model is not None and not samples_file(out, name).is_file():
            write_samples(model, samplers, budget, cfg, samples_file(out, name))
        rows += [{"run": name, "family": family, "seed": seed, **r} for r in found]
    return rows


def load_scores(runs: list[Run], out: Path) -> list[dict[str, Any]]:
    """Rows from the cached scores only (for `--report-only`)."""
    rows = []
    for name, family, seed in [("teacher", "teacher", 0)] + [(r.name, r.family, r.seed) for r in runs if r.samplers]:
        cache = out / "scores" / f"{name}.json"
        if cache.is_file():
            rows += [{"run": name, "family": family, "seed": seed, **r} for r in json.loads(cache.read_text())]
    return rows

"""What the periodic sampling evaluations share: when to run, sampling with EMA swapped in, logging, the CSV curve.

Subclasses choose the prompts and compute the numbers (`score`); metric networks (I3D, CLIP) live in the callback,
never in the LightningModule's state. Every evaluation also logs collapse diagnostics — motion, seed diversity and
colour saturation — beside the same figures for real videos, so a DMD collapse shows at the step it starts.
"""

from __future__ import annotations

import csv
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tmd_lightning.callbacks.ema import find_ema
from tmd_lightning.callbacks.videos import log_videos
from tmd_lightning.metrics.diagnostics import colour_saturation, motion_magnitude, seed_diversity

log = logging.getLogger(__name__)


def diagnostics(videos: torch.Tensor, prompt_ids: list[Any]) -> dict[str, float]:
    """Motion, saturation and (when some prompt has two videos) seed diversity of uint8 videos."""
    out = {"motion": float(motion_magnitude(videos)), "saturation": float(colour_saturation(videos))}
    if len(set(prompt_ids)) < len(prompt_ids):
        out["diversity"] = float(seed_diversity(videos, prompt_ids))
    return out


class SamplingEvalCallback(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training) samples fixed prompts with fixed seeds.

    The end-of-training evaluation is skipped under `fast_dev_run` and for runs shorter than one period (a smoke
    test or a `trainer.max_steps=5` check should not spend minutes sampling); `every_n_steps=0` with
    `at_train_end=true` evaluates at the end of any run.

    Args:
        every_n_steps: evaluation period in optimizer steps (0 disables periodic evaluation).
        seeds: one video per (prompt, seed); two or more seeds give the seed-diversity diagnostic.
        sampler: keyword arguments for the stage's sampler (e.g. steps, cfg; M, N).
        num_videos_logged: how many samples go to TensorBoard as a video summary (one padded grid, 4 per row,
            with a `<prefix>/samples/legend` text summary naming each one's prompt and seed).
        prefix: the logging namespace (`toy/`, `eval/`).
    """

    prefix = "eval"

    def __init__(self, every_n_steps: int = 500, seeds: tuple[int, ...] = (0,), sampler: dict | None = None,
                 num_frames: int = 9, height: int = 16, width: int = 16, batch_size: int = 96,
                 num_videos_logged: int = 8, at_train_end: bool = True) -> None:
        self.every_n_steps, self.seeds = every_n_steps, list(seeds)
        self.sampler = dict(sampler or {})
        self.shape = (num_frames, height, width)
        self.batch_size, self.num_videos_logged, self.at_train_end = batch_size, num_videos_logged, at_train_end
        self._real_diagnostics: dict[str, float] | None = None
        self._last_step = -1

    # -- what subclasses provide ---------------------------------------------------------------------------------------
    metric_keys: tuple[str, ...] = ()  # what `score` returns (without the prefix), for `hparam_metrics`

    def prompts(self, trainer: L.Trainer) -> list[str]:
        raise NotImplementedError

    def score(self, trainer: L.Trainer, videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
        """Metric values of generated videos (keys without the prefix)."""
        raise NotImplementedError

    def real_videos(self, trainer: L.Trainer, limit: int = 2048) -> tuple[torch.Tensor, list[str]] | None:
        """Real videos and captions from the DataModule's validation (else training) set, for reference figures."""
        dm = trainer.datamodule
        dataset = getattr(dm, "val_set", None) or getattr(dm, "train_set", None)
        if dataset is None:
            return None
        items = [it for it in (dataset[i] for i in range(min(len(dataset), limit))) if "video" in it]
        if not items:
            return None
        return torch.stack([it["video"] for it in items]), [it["caption"] for it in items]

    def hparam_metrics(self) -> list[str]:
        """The scalar names this callback logs at the end of training: TensorBoard's HParams tab compares runs by
        them (`fit` lists them with the config's hyperparameters)."""
        own = [f"{self.prefix}/{k}" for k in (*self.metric_keys, "seconds_per_video", "effective_nfe")]
        diversity = ["diagnostics/diversity"] if len(self.seeds) > 1 else []
        return [*own, "diagnostics/motion", "diagnostics/saturation", *diversity]

    # -- the shared loop -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 captions: list[str], seeds: list[int]) -> tuple[torch.Tensor, float]:
        ema = find_ema(trainer)
        was_training = pl_module.training
        pl_module.eval()
        start = time.perf_counter()
        videos = []
        with ema.swapped(pl_module) if ema else nullcontext():
            for i in range(0, len(captions), self.batch_size):
                videos.append(pl_module.generate(captions[i : i + self.batch_size], seeds[i : i + self.batch_size],
                                                 *self.shape, **self.sampler).cpu())
        pl_module.train(was_training)
        return torch.cat(videos), (time.perf_counter() - start) / len(captions)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        prompts = self.prompts(trainer)
        captions = [c for c in prompts for _ in self.seeds]
        seeds = [s for _ in prompts for s in self.seeds]
        log.info("%s eval at step %d: sampling %d videos (%d prompts x %d seeds)", self.prefix, trainer.global_step,
                 len(captions), len(prompts), len(self.seeds))
        videos, seconds = self.generate(trainer, pl_module, captions, seeds)
        metrics = {f"{self.prefix}/{k}": v for k, v in self.score(trainer, videos, captions).items()}
        metrics |= {f"diagnostics/{k}": v for k, v in diagnostics(videos, captions).items()}
        metrics |= {f"diagnostics/{k}_real": v for k, v in self._real_reference(trainer).items()}
        metrics[f"{self.prefix}/seconds_per_video"] = seconds
        metrics[f"{self.prefix}/effective_nfe"] = float(pl_module.sampler_nfe(**self.sampler))
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        shown = list(range(len(videos)))[:: max(1, len(videos) // self.num_videos_logged)][: self.num_videos_logged]
        log_videos(trainer, f"{self.prefix}/samples", videos[shown], step,
                   labels=[f"{captions[i]} (seed {seeds[i]})" for i in shown])
        if getattr(trainer, "is_global_zero", True):  # every rank samples (FSDP2 needs all of them); one writes
            self._append_csv(trainer, step, metrics)
        log.info("%s eval at step %d: %s", self.prefix, step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _real_reference(self, trainer: L.Trainer) -> dict[str, float]:
        if self._real_diagnostics is None:
            real = self.real_videos(trainer)
            self._real_diagnostics = diagnostics(*real) if real is not None else {}
        return self._real_diagnostics

    def _append_csv(self, trainer: L.Trainer, step: int, metrics: dict[str, float]) -> None:
        path = Path(trainer.default_root_dir) / f"{self.prefix}_eval.csv"
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *metrics])
            if new:
                writer.writeheader()
            writer.writerow({"step": step, **metrics})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step and step > 0:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or trainer.fast_dev_run:
            return
        if trainer.global_step < self.every_n_steps:
            log.info("no end-of-run %s evaluation: the run took %d steps, less than one evaluation period (%d)",
                     self.prefix, trainer.global_step, self.every_n_steps)
            return
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.evaluate(trainer, pl_module)

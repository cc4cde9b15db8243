"""Periodic toy-world evaluation: sample fixed prompts with fixed seeds, score them, log numbers and videos.

Every `every_n_steps` optimizer steps (and at the end of training) the stage's `generate` produces one video per
(prompt, seed); the analytic toy metrics give per-attribute and joint accuracy, and toy-FD compares them with the
real validation videos. Numbers go to the logger and to `toy_eval.csv` in the run folder (the learning curve),
a few videos go to TensorBoard as video summaries. Metric code lives here, never in the LightningModule.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tmd_lightning.callbacks.ema import find_ema
from tmd_lightning.callbacks.videos import log_videos
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.toy import ToyAccuracy, toy_features

log = logging.getLogger(__name__)


class ToyEvalCallback(L.Callback):
    """Scores generated toy videos during training.

    Args:
        every_n_steps: evaluation period in optimizer steps (0 disables periodic evaluation).
        seeds: one video per (prompt, seed); prompts are the 48 captions of the toy grammar.
        sampler: keyword arguments for the stage's sampler (e.g. steps, cfg).
        num_videos_logged: how many samples go to TensorBoard as a video summary.
    """

    def __init__(self, every_n_steps: int = 500, seeds: tuple[int, ...] = (0,), sampler: dict | None = None,
                 num_frames: int = 9, height: int = 16, width: int = 16, batch_size: int = 96,
                 num_videos_logged: int = 8, at_train_end: bool = True) -> None:
        self.every_n_steps, self.seeds = every_n_steps, list(seeds)
        self.sampler = dict(sampler or {})
        self.shape = (num_frames, height, width)
        self.batch_size, self.num_videos_logged, self.at_train_end = batch_size, num_videos_logged, at_train_end
        self._real_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_step = -1

    def _real(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._real_stats is None:
            dm = trainer.datamodule
            dataset = getattr(dm, "val_set", None) or getattr(dm, "train_set", None)
            if dataset is None:
                return None
            videos = [it["video"] for it in (dataset[i] for i in range(min(len(dataset), 2048))) if "video" in it]
            self._real_stats = gaussian_stats(toy_features(torch.stack(videos)))
        return self._real_stats

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        captions = [c for c in all_captions() for _ in self.seeds]
        seeds = [s for _ in all_captions() for s in self.seeds]
        ema = find_ema(trainer)
        was_training = pl_module.training
        pl_module.eval()
        start = time.perf_counter()
        videos = []
        with ema.swapped(pl_module) if ema else _nullcontext():
            for i in range(0, len(captions), self.batch_size):
                videos.append(pl_module.generate(captions[i : i + self.batch_size], seeds[i : i + self.batch_size],
                                                 *self.shape, **self.sampler).cpu())
        seconds = (time.perf_counter() - start) / len(captions)
        pl_module.train(was_training)
        videos = torch.cat(videos)
        acc = ToyAccuracy()
        acc.update(videos, captions)
        metrics = {f"toy/acc_{k}": float(v) for k, v in acc.compute().items()}
        real = self._real(trainer)
        if real is not None:
            mu, sigma = gaussian_stats(toy_features(videos))
            metrics["toy/fd"] = float(frechet_distance(mu, sigma, *real))
        metrics["toy/seconds_per_video"] = seconds
        metrics["toy/effective_nfe"] = float(pl_module.sampler_nfe(**self.sampler))
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log_videos(trainer, "toy/samples", videos[:: max(1, len(videos) // self.num_videos_logged)]
                   [: self.num_videos_logged], step)
        self._append_csv(trainer, step, metrics)
        log.info("toy eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _append_csv(self, trainer: L.Trainer, step: int, metrics: dict[str, float]) -> None:
        folder = Path(trainer.default_root_dir)
        path = folder / "toy_eval.csv"
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
        if self.at_train_end and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.evaluate(trainer, pl_module)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

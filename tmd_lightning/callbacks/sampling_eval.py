"""What the periodic sampling evaluations share: when to run, sampling with EMA swapped in, logging, the CSV curve.

Subclasses choose the prompts and compute the numbers (`score`); metric networks (I3D, CLIP) live in the callback,
never in the LightningModule's state. Every evaluation also logs collapse diagnostics — motion, seed diversity and
colour saturation — beside the same figures for real videos, so a DMD collapse shows at the step it starts.

Under DDP / FSDP2 the ranks share the sampling: rank r takes items r, r + W, ... (with as many batches on every rank,
which FSDP2 needs), rank 0 gathers the videos in order, scores, logs and writes, and every rank returns its numbers;
videos depend only on their (prompt, seed), so the figures equal a single process's.
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
from tmd_lightning.evaluation.scores import diagnostics

log = logging.getLogger(__name__)


def rank_items(n: int, rank: int, world_size: int, batch_size: int) -> tuple[list[int], list[list[int]]]:
    """Rank `rank`'s items `rank, rank + world_size, ...` of `n`, and its batches as positions in that list: every
    rank gets as many batches as the rank with most items (positions past its own items are padding), since under
    FSDP2 every rank must join every forward of a sharded network."""
    mine = list(range(rank, n, world_size))
    most = -(-n // world_size)
    return mine, [list(range(i, min(i + batch_size, most))) for i in range(0, most, batch_size)]


def _distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_items(local: torch.Tensor, mine: list[int], n: int, world_size: int) -> torch.Tensor | None:
    """Every rank's `local` videos (its items `mine`) gathered on rank 0 into the items' order (CPU tensors through
    `gather_object`, any backend); None on the other ranks; `local` itself when there is one process."""
    if not _distributed(world_size):
        return local
    rank = torch.distributed.get_rank()
    parts: list | None = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object((mine, local), parts, dst=0)
    if rank != 0:
        return None
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for items, videos in parts:
        if items:
            out[items] = videos
    return out


def share_metrics(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Rank 0's metrics on every rank (the others sampled but did not score)."""
    if not _distributed(world_size):
        return metrics
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
                 captions: list[str], seeds: list[int]) -> tuple[torch.Tensor | None, float]:
        """uint8 videos of every (caption, seed) and the wall-clock seconds per video. Under a multi-process strategy
        the items are split across the ranks (`rank_items`), sampled, and gathered on rank 0 in the original order
        (the other ranks get None); each video depends only on its (caption, seed), so the result equals one
        process's."""
        ema = find_ema(trainer)
        was_training = pl_module.training
        pl_module.eval()
        start = time.perf_counter()
        rank, world = getattr(trainer, "global_rank", 0), getattr(trainer, "world_size", 1)
        mine, batches = rank_items(len(captions), rank, world, self.batch_size)
        videos = []
        with ema.swapped(pl_module) if ema else nullcontext():
            for batch in batches:  # every rank runs as many batches (FSDP2: each forward gathers sharded weights)
                items = [mine[i] if i < len(mine) else 0 for i in batch]  # padding re-samples item 0, discarded
                out = pl_module.generate([captions[i] for i in items], [seeds[i] for i in items], *self.shape,
                                         **self.sampler).cpu()
                videos.append(out[: max(0, min(len(batch), len(mine) - batch[0]))])
        pl_module.train(was_training)
        local = torch.cat(videos) if videos else torch.zeros(0, dtype=torch.uint8)
        gathered = gather_items(local, mine, len(captions), world)
        return gathered, (time.perf_counter() - start) / len(captions)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        prompts = self.prompts(trainer)
        captions = [c for c in prompts for _ in self.seeds]
        seeds = [s for _ in prompts for s in self.seeds]
        log.info("%s eval at step %d: sampling %d videos (%d prompts x %d seeds)", self.prefix, trainer.global_step,
                 len(captions), len(prompts), len(self.seeds))
        videos, seconds = self.generate(trainer, pl_module, captions, seeds)
        world = getattr(trainer, "world_size", 1)
        if videos is None:  # rank 0 scores, logs and writes; the others get its numbers
            return share_metrics({}, world)
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
        self._append_csv(trainer, step, metrics)  # on rank 0 only: the others returned above
        log.info("%s eval at step %d: %s", self.prefix, step, {k: round(v, 4) for k, v in metrics.items()})
        return share_metrics(metrics, world)

    def _real_reference(self, trainer: L.Trainer) -> dict[str, float]:
        if self._real_diagnostics is None:
            real = self.real_videos(trainer)
            self._real_diagnostics = diagnostics(*real) if real is not None else {}
        return self._real_diagnostics

    def _append_csv(self, trainer: L.Trainer, step: int, metrics: dict[str, float]) -> None:
        path = Path(trainer.default_root_dir) / f"{self.prefix}_eval.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
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

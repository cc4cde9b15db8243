"""Periodic toy-world evaluation: sample the 48 toy prompts with fixed seeds, score them, log numbers and videos.

Per-attribute and joint accuracy from the analytic toy classifiers, toy-FD against the real validation videos, the
collapse diagnostics of `SamplingEvalCallback`, a few videos as TensorBoard video summaries and `toy_eval.csv` in the
run folder (the learning curve).
"""

from __future__ import annotations

import lightning as L
import torch

from tmd_lightning.callbacks.sampling_eval import SamplingEvalCallback
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.evaluation.scores import toy_accuracy, toy_fd, toy_stats


class ToyEvalCallback(SamplingEvalCallback):
    """Toy accuracy (`toy/acc_*`), toy-FD (`toy/fd`) and diagnostics every `every_n_steps` optimizer steps."""

    prefix = "toy"
    metric_keys = ("acc_joint", "acc_colour", "acc_shape", "acc_direction", "acc_axis", "acc_sign", "fd")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._real_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def prompts(self, trainer: L.Trainer) -> list[str]:
        return all_captions()

    def score(self, trainer: L.Trainer, videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
        metrics = toy_accuracy(videos, captions)  # rank 0 scores every video alone
        if self._real_stats is None:
            real = self.real_videos(trainer)
            self._real_stats = toy_stats(real[0]) if real is not None else None
        if self._real_stats is not None:
            metrics["fd"] = toy_fd(videos, self._real_stats)
        return metrics

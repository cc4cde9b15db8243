"""Periodic evaluation for real data: FVD against the validation videos and CLIP score, plus the diagnostics.

Prompts come from a text file (one per line) or, by default, the first captions of the validation set. FVD uses the
StyleGAN-V I3D TorchScript detector from a local path (`fvd_detector`); CLIP score a local CLIP folder (`clip_model`);
either is skipped when its path is not given. Both networks are held here, not in the LightningModule.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tmd_lightning.callbacks.sampling_eval import SamplingEvalCallback
from tmd_lightning.evaluation.scores import score_clip, score_fvd
from tmd_lightning.metrics.fvd import FrechetVideoDistance, I3DFeatures


class VideoEvalCallback(SamplingEvalCallback):
    """FVD (`eval/fvd`, with `eval/fvd_num_real` / `eval/fvd_num_fake`), CLIP score (`eval/clip_score`) and diagnostics.

    Args:
        prompts: a text file with one prompt per line, or None for the first `num_prompts` validation captions.
        fvd_detector: path of `i3d_torchscript.pt` (or its folder); None skips FVD.
        clip_model: a local CLIP folder (transformers layout); None skips the CLIP score.
        num_real: real validation videos the FVD reference uses.
    """

    prefix = "eval"

    def __init__(self, *args, prompts: str | None = None, num_prompts: int = 32, fvd_detector: str | None = None,
                 clip_model: str | None = None, num_real: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_file, self.num_prompts, self.num_real = prompts, num_prompts, num_real
        # rank 0 scores every video alone (SamplingEvalCallback gathers them): the metrics sync nothing across ranks;
        # FVD's real side is embedded at the first evaluation and kept through every later round's reset
        self.fvd = FrechetVideoDistance(I3DFeatures(fvd_detector), sync_on_compute=False,
                                        reset_real_features=False) if fvd_detector else None
        self.clip = None
        if clip_model:
            from tmd_lightning.metrics.clip_score import VideoCLIPScore

            self.clip = VideoCLIPScore(clip_model, sync_on_compute=False)

    @property
    def metric_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*(("fvd",) if self.fvd is not None else ()), *(("clip_score",) if self.clip is not None else ()))

    def prompts(self, trainer: L.Trainer) -> list[str]:
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise FileNotFoundError(f"prompt file not found: {path}")
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        real = self.real_videos(trainer, limit=self.num_prompts)
        if real is None:
            raise RuntimeError("VideoEvalCallback needs `prompts` (a file) or a DataModule with a validation set")
        return list(dict.fromkeys(real[1]))

    def score(self, trainer: L.Trainer, videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.fvd is not None:
            if self.fvd.num_real == 0:  # the real side once: `reset` keeps it for later rounds
                real = self.real_videos(trainer, limit=self.num_real)
                if real is None:
                    raise RuntimeError("FVD needs a DataModule with validation videos")
                self.fvd.update(real[0], real=True)
            metrics |= {k: float(v) for k, v in score_fvd(self.fvd, videos).items()}
        if self.clip is not None:
            metrics["clip_score"] = score_clip(self.clip, videos, captions)
        return metrics

"""Stage 0: train a Wan teacher with rectified flow matching (the toy teacher is made this way)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from tmd_lightning.flow import interpolate, shift
from tmd_lightning.losses import flow_matching_loss
from tmd_lightning.models.wan_parts import wan_velocity
from tmd_lightning.sampling import TeacherSampler
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.foreground import check_foreground_codec, foreground_weights


class TeacherStage(VideoStage):
    """Flow matching for a `WanTransformer3DModel`.

    Args:
        transformer: the Wan model to train.
        cond_dropout: probability of replacing a caption by the negative prompt (enables CFG at sampling).
        t_shift: time shift gamma applied to U(t_min, t_max) training times; > 1 favours high noise, where the
            layout and motion of a video are decided.
        sampler: defaults for `generate` (steps, cfg, gamma, solver).
        activation_checkpointing: one activation checkpoint per Wan block (memory for compute).
        foreground_weight: w of the toy teacher's loss weight `1 + w * mask` on the pixels of the moving shape and
            the one-pixel ring around it (`stages/foreground.py`); 0 = the plain flow-matching loss. CFG-5 samples of
            an unweighted teacher drew blurred, speckled squares that read as circles. Needs the pixel codec.
    """

    def __init__(
        self,
        transformer: nn.Module,
        codec: nn.Module,
        text_encoder: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        negative_prompt: str = "",
        cond_dropout: float = 0.1,
        t_shift: float = 3.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        sampler: dict[str, Any] | None = None,
        activation_checkpointing: bool = False,
        foreground_weight: float = 0.0,
    ) -> None:
        check_foreground_codec(foreground_weight, codec)
        super().__init__(codec, text_encoder, negative_prompt)
        self.save_hyperparameters(ignore=["transformer", "codec", "text_encoder"], logger=False)
        self.transformer = transformer
        self.activation_checkpointing = activation_checkpointing
        self.sampler = TeacherSampler().with_options(**dict(sampler or {}))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Teacher velocity `v(x_t, t, c)` in float32, for weights in any dtype; Wan is called with timestep 1000 t."""
        return wan_velocity(self.transformer, x, t, text)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.skip_empty_batch(batch):
            return self.skipped_step()
        x, text = self.encode_batch(batch)
        b = x.shape[0]
        h = self.hparams
        drop = torch.rand(b, device=self.device) < h.cond_dropout
        text = torch.where(drop[:, None, None], self.negative_embedding(b), text)
        u = torch.rand(b, device=self.device) * (h.t_max - h.t_min) + h.t_min
        t = shift(u, h.t_shift)
        noise = torch.randn_like(x)
        x_t = interpolate(x, noise, t)
        weight = self.foreground_weights(batch) if h.foreground_weight > 0 else None
        loss = flow_matching_loss(self.velocity(x_t, t, text), x, noise, weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def foreground_weights(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-latent loss weights `1 + foreground_weight * mask` of the batch's videos (`stages/foreground.py`)."""
        return foreground_weights(batch, self.codec, self.hparams.foreground_weight)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Flow-matching loss at fixed t values (seeded), so validation curves are comparable across steps."""
        if self.skip_empty_batch(batch):
            return
        x, text = self.encode_batch(batch)
        g = torch.Generator(device="cpu").manual_seed(batch_idx)
        losses = []
        for t_val in (0.25, 0.5, 0.75, 0.95):
            noise = torch.randn(x.shape, generator=g).to(x)
            t = torch.full((x.shape[0],), t_val, device=self.device)
            x_t = interpolate(x, noise, t)
            loss = flow_matching_loss(self.velocity(x_t, t, text), x, noise)
            self.log(f"val/loss_t{t_val}", loss, batch_size=x.shape[0], sync_dist=True)
            losses.append(loss)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x.shape[0], sync_dist=True)

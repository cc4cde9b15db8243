"""Stage 1 (adapt_head): the flow head becomes a conditional flow map, trained with TM-MeanFlow (docs/method.md §4)."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn

from tmd_lightning.flow import interpolate, shift, time_grid, velocity_target
from tmd_lightning.losses import adaptive_loss, cfg_target, finite_difference_ds, meanflow_target, sample_r
from tmd_lightning.models.wan_parts import compute_dtype
from tmd_lightning.runtime.parallel import rows_to_run
from tmd_lightning.sampling import TMDSampler
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.foreground import check_foreground_codec, foreground_weights


class AdaptHeadStage(VideoStage):
    """TM-MeanFlow fine-tuning of the whole student (backbone features are not detached).

    Per batch (docs/method.md §4): outer t from the outer grid; condition dropout to the negative prompt; inner times
    `s = shift(U(s_min, s_max), s_shift)`, `r` = the inner-grid point below s, or r = s on a fraction
    `p_r_equals_s` of rows; the CFG target `ṽ = ω v + (1 - ω) u(y_s, s, s; c_neg)`; the MeanFlow target
    `û = ṽ - (s - r) du/ds` with a finite-difference du/ds; the adaptively normalised loss.

    Args:
        student: the `TMDTransformer`.
        M: outer transition steps; N: inner flow-head steps (training grids and sampler defaults).
        grid_gamma: shift of both student grids (10); t_max: their last point (0.999, as Wan was pretrained).
        cond_dropout: probability of replacing a caption by the negative prompt.
        s_shift, s_min, s_max: the inner-time sampler.
        p_r_equals_s: fraction of rows trained as plain transition matching (r = s); 0.75 in the paper.
        cfg_scale: ω of the CFG target (1 disables it).
        fd_delta: δ of the finite difference; 5e-3 deliberately smooths the derivative in s (docs/method.md §4).
        fd_full_precision: run the two finite-difference head passes with autocast off, in the weights' dtype
            (float32 under `bf16-mixed`). In bf16 activations the step ±δ·ṽ is one or two ulps of y_s and the
            difference of the two passes is mostly rounding; the passes (no grad, the r < s rows only) then cost
            float32 instead of bf16 speed.
        loss_c: c of the adaptive loss per element, c = loss_c · d (1 for Wan 1.3B, 1e-5 for 14B).
        plain_tm: ablation, always r = s (transition matching without the flow map).
        activation_checkpointing: one activation checkpoint per Wan block of the student (memory for compute).
        new_parts_lr_scale: learning rate of the parts the teacher does not have (Δ-embedder, inner fusion; they start
            at zero) as a multiple of the optimizer's; 1 = one rate for all (the paper).
        foreground_weight: w of the toy's shape weight `1 + w * mask` on the per-element error (the teacher's, in
            `stages/foreground.py`); 0 = unweighted (the paper). Needs the pixel codec and decoded videos.
        global_batch: videos per optimizer step over all GPUs (recorded only: `tmd_lightning.fit` turns it into
            Lightning's `accumulate_grad_batches`).
    """

    network_attr = "student"

    def __init__(
        self,
        student: nn.Module,
        codec: nn.Module,
        text_encoder: nn.Module,
        optimizer: partial | None,
        scheduler: partial | None = None,
        negative_prompt: str = "",
        M: int = 2,
        N: int = 2,
        grid_gamma: float = 10.0,
        t_max: float = 0.999,
        cond_dropout: float = 0.1,
        s_shift: float = 3.0,
        s_min: float = 0.001,
        s_max: float = 0.999,
        p_r_equals_s: float = 0.75,
        cfg_scale: float = 3.0,
        fd_delta: float = 5e-3,
        fd_full_precision: bool = True,
        loss_c: float = 1.0,
        plain_tm: bool = False,
        activation_checkpointing: bool = False,
        foreground_weight: float = 0.0,
        new_parts_lr_scale: float = 1.0,
        global_batch: int | None = None,
    ) -> None:
        check_foreground_codec(foreground_weight, codec)
        super().__init__(codec, text_encoder, negative_prompt)
        self.save_hyperparameters(ignore=["student", "codec", "text_encoder"], logger=False)
        self.student = student
        self.M, self.N = M, N
        self.sampler = TMDSampler(M, N, grid_gamma, t_max)
        self.register_buffer("outer_grid", time_grid(M, grid_gamma, t_max).float(), persistent=False)
        self.register_buffer("inner_grid", time_grid(N, grid_gamma, t_max).float(), persistent=False)
        self.activation_checkpointing = activation_checkpointing
        if not 0.0 < fd_delta < 0.5:
            raise ValueError(f"fd_delta must be in (0, 0.5), got {fd_delta}")
        if new_parts_lr_scale <= 0:
            raise ValueError(f"new_parts_lr_scale must be > 0, got {new_parts_lr_scale}")
        if new_parts_lr_scale != 1.0 and optimizer is not None and "lr" not in optimizer.keywords:
            raise ValueError("new_parts_lr_scale needs the optimizer's lr in its config (optimizer.lr)")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student's trainable parameters; the new parts in a group of their own when `new_parts_lr_scale` != 1
        (the group's lr is the optimizer's times the scale, so schedulers scale both alike)."""
        scale = self.hparams.new_parts_lr_scale
        if scale == 1.0:
            return super().parameter_groups()
        trainable = super().parameter_groups()[0]["params"]
        new = {id(p) for p in self.student.new_parameters()}
        base_lr = self.hparams.optimizer.keywords["lr"]
        return [{"params": [p for p in trainable if id(p) not in new]},
                {"params": [p for p in trainable if id(p) in new], "lr": base_lr * scale}]

    def full_precision_modules(self) -> list[nn.Module]:
        """With `fd_full_precision` the finite-difference head passes run with autocast off in the weights' dtype:
        under FSDP2 the student's head blocks and its root unit (fusion, Δ-embedder, output head) are then gathered in
        float32, the backbone's blocks in bf16 (`runtime/parallel.py`)."""
        if not self.hparams.fd_full_precision:
            return []
        wan = self.student.wan
        return [self.student, *wan.blocks[len(wan.blocks) - self.student.head_blocks:]]

    def tm_meanflow_loss(self, x: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None,
                         weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The TM-MF loss of one batch of latents `x` and text embeddings; `generator` makes it deterministic;
        `weight`: optional per-latent error weights (the toy's shape weight)."""
        h, student = self.hparams, self.student
        b, device = x.shape[0], x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator).to(device)

        def randn() -> torch.Tensor:
            return torch.randn(x.shape, generator=generator).to(x)

        # 1. outer step: t_i uniform on t_1 .. t_M
        t = self.outer_grid[(rand(b) * self.M).long().clamp(max=self.M - 1) + 1]
        eps = randn()
        x_t = interpolate(x, eps, t)
        # 2. condition dropout to the negative prompt
        neg = self.negative_embedding(b)
        dropped = rand(b) < h.cond_dropout
        text = torch.where(dropped[:, None, None], neg, text)
        # 3. inner times and the inner flow toward y = eps - x
        y, y1 = velocity_target(x, eps), randn()
        s = shift(rand(b) * (h.s_max - h.s_min) + h.s_min, h.s_shift)
        r = s.clone() if h.plain_tm else sample_r(s, self.inner_grid, h.p_r_equals_s, rand(b))
        y_s = interpolate(y, y1, s)
        v = y1 - y
        m = student.backbone(x_t, t, text)
        with torch.no_grad():
            # 4. CFG target on the rows that kept their caption
            guided = ~dropped if h.cfg_scale != 1.0 else torch.zeros_like(dropped)
            u_neg = torch.zeros_like(v)
            # (under FSDP2 every rank makes these data-dependent calls when any rank needs them: `rows_to_run`)
            idx, run = rows_to_run(student, guided)
            if run:
                m_neg = student.backbone(x_t[idx], t[idx], neg[idx])
                u_g = student.average_velocity(y_s[idx], s[idx], s[idx], m_neg, y1[idx])
                if guided.any():
                    u_neg[guided] = u_g
            v_tilde = cfg_target(v, u_neg, h.cfg_scale, guided)
            # 5. MeanFlow target: du/ds by finite differences on the rows with r < s, sharing this m
            target = v_tilde.clone()
            flow_map_rows = r < s
            idx, run = rows_to_run(student, flow_map_rows)
            if run:
                m_fd, y1_fd, r_fd = m.select(idx).detach().repeat(2), y1[idx].repeat(2, 1, 1, 1, 1), r[idx].repeat(2)
                if h.fd_full_precision:  # m from the autocast pass is bf16: back to the weights' dtype
                    m_fd = m_fd.to(compute_dtype(student.wan))

                def u_fn(samples: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
                    return student.average_velocity(samples, s_, r_fd, m_fd, y1_fd)

                with torch.autocast(x.device.type, enabled=False) if h.fd_full_precision else nullcontext():
                    du_ds = finite_difference_ds(u_fn, y_s[idx], s[idx], v_tilde[idx], h.fd_delta)
                if flow_map_rows.any():
                    target[idx] = meanflow_target(v_tilde[idx], du_ds, s[idx], r[idx])
        # 6. adaptive loss on u_θ(y_s, s, r)
        u = student.average_velocity(y_s, s, r, m, y1)
        d = x[0].numel()
        loss, e = adaptive_loss(u, target, h.loss_c * d, weight)
        mse = e / d
        stats = {"mse": mse.mean(), "frac_flow_map": flow_map_rows.float().mean()}
        if flow_map_rows.any():
            stats["mse_flow_map"] = mse[flow_map_rows].mean()
        if (~flow_map_rows).any():
            stats["mse_tm"] = mse[~flow_map_rows].mean()
        return loss, stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.skip_empty_batch(batch):
            return self.skipped_step()
        x, text = self.encode_batch(batch)
        weight = foreground_weights(batch, self.codec, self.hparams.foreground_weight) \
            if self.hparams.foreground_weight > 0 else None
        loss, stats = self.tm_meanflow_loss(x, text, weight=weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The same loss with seeded randomness, so validation curves are comparable across steps."""
        if self.skip_empty_batch(batch):
            return
        x, text = self.encode_batch(batch)
        loss, stats = self.tm_meanflow_loss(x, text, torch.Generator().manual_seed(batch_idx))
        self.log("val/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=True)  # mean over ranks' shards
        self.log("val/mse", stats["mse"], batch_size=x.shape[0], sync_dist=True)


"""Stage 2 (distill): DMD2-v distribution matching with the flow head unrolled, and the DMD2-v baseline
(docs/method.md §5).

Four networks: the student (trained), the frozen teacher (never trained, never in checkpoints), the fake score
(teacher architecture and init, trained on the student's samples) and the discriminator (Conv3D heads on
frozen-teacher features). Manual optimisation with exclusive iterations (TTUR): iteration i updates the student
when `i % student_every == 0` and the critics (fake score + discriminator) otherwise.

Gradient accumulation (`global_batch`): one iteration (one update of the student, or of the critics) consumes
k = global_batch / (world size x micro batch) consecutive batches. Each micro-step backpropagates its loss scaled by
1/k; gradients are zeroed at the first micro-step, synchronised across ranks only at the last (DDP: no reduction
before it; FSDP2: `set_requires_gradient_sync`), then clipped and stepped once. With equal micro batches the update
equals one of the whole global batch (tests/stages/test_distill_accumulation.py). `iteration`, `max_iterations`,
the TTUR schedule and Lightning's `global_step` (one optimizer step per update) all count updates.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tmd_lightning.flow import interpolate, shift, time_grid, x0_from_velocity
from tmd_lightning.losses import (
    flow_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    vsd_gradient,
    vsd_loss,
)
from tmd_lightning.models.lora import (
    FAKE_SCORE,
    STUDENT,
    AdapterView,
    LoraSettings,
    adapter_parameters,
    add_lora,
    cast_keeping_adapters,
    merged_copy,
)
from tmd_lightning.models.wan_parts import block_features, wan_velocity
from tmd_lightning.runtime.finite import agreed, all_finite, non_finite_error
from tmd_lightning.runtime.rng import gather_rng_states, restore_rng, rng_state
from tmd_lightning.sampling import FewStepSampler, TMDSampler, cfg_velocity
from tmd_lightning.stages.base import VideoStage
from tmd_lightning.stages.foreground import check_foreground_codec, foreground_weights

log = logging.getLogger(__name__)

X_HAT = ("eps_minus_y", "x_minus_ty")


class DistillStage(VideoStage):
    """What TMD and DMD2-v distillation share; subclasses define the student's one-step sample and sampler.

    Args:
        student: the network being distilled (a `TMDTransformer`, or a Wan transformer for DMD2-v).
        teacher: the frozen Wan teacher; held in bf16 on GPU (`teacher_dtype`), float32 on CPU.
        discriminator: a partial of `Discriminator` completed with the teacher's width; None disables the GAN.
        optimizer: a partial optimizer used for each trainable network (AdamW lr 1e-5 in the paper).
        M: outer student steps; grid_gamma / t_max: the student grid.
        cfg_scale: the teacher's guidance in the VSD target, `v_neg + w (v_cond - v_neg)`.
        dmd_shift, dmd_t_min, dmd_t_max: the VSD / critic time `t = shift(U(t_min, t_max), dmd_shift)`.
        gan_weight: λ in `L_vsd + λ L_gan`; use_gan: the "no GAN" ablation when False.
        student_every: TTUR period (5: one student iteration, then four critic iterations).
        vsd_reduction: "mean": ½ mean over all elements (DMD2 / FastGen; λ = 0.03 refers to it); "sum": ½ sum per
            sample (its x̂-gradient is d times larger, d = elements per sample).
        grad_clip: max gradient norm per network (None: no clipping; norms are logged either way).
        max_iterations: stop after this many iterations (None: let the trainer decide).
        lora: LoRA mode (`models.lora.LoraSettings`: fake_score, student, rank, alpha, target_modules). With
            `fake_score` the fake score is an adapter on the frozen teacher's weights (an `AdapterView`, enabled only
            during its calls: teacher and discriminator features see the plain teacher); with `student` the student's
            Wan blocks train as an adapter on its own frozen base, exported merged.
        activation_checkpointing: one activation checkpoint per Wan block (student, fake score, teacher features).
        foreground_weight: w of the toy's shape weight `1 + w * mask` (`stages/foreground.py`, the teacher's) on the
            fake score's flow-matching loss, the mask drawn from each decoded student sample; 0 = the paper. The
            fake score must see where the student's shapes differ from the teacher's for the VSD gradient to
            carry it, and on the 16 x 16 toy that is a few corner pixels. Needs the pixel codec.
        global_batch: samples per update over all ranks and micro-steps (None: one batch per update, no
            accumulation). Must be a multiple of world size x the batch size (checked at the first step); the
            micro-steps of an update all take the TTUR phase of that update. A checkpoint saved mid-accumulation
            (only possible when validation or an epoch end falls inside an update) does not hold the partial
            gradients: a run resumed from it restarts that update from its first micro-step (logged).
    """

    network_attr = "student"

    def __init__(self, student: nn.Module, teacher: nn.Module, codec: nn.Module, text_encoder: nn.Module,
                 optimizer: partial | None, discriminator: partial | nn.Module | None = None,
                 negative_prompt: str = "", M: int = 2, grid_gamma: float = 10.0, t_max: float = 0.999,
                 cfg_scale: float = 5.0, dmd_shift: float = 5.0, dmd_t_min: float = 0.001, dmd_t_max: float = 0.999,
                 gan_weight: float = 0.03, use_gan: bool = True, student_every: int = 5,
                 vsd_reduction: str = "mean", grad_clip: float | None = None, teacher_dtype: str = "bfloat16",
                 max_iterations: int | None = None, lora: dict[str, Any] | None = None,
                 activation_checkpointing: bool = False, global_batch: int | None = None,
                 foreground_weight: float = 0.0) -> None:
        check_foreground_codec(foreground_weight, codec)
        super().__init__(codec, text_encoder, negative_prompt)
        if global_batch is not None and global_batch < 1:
            raise ValueError(f"global_batch must be a positive number of samples or None, got {global_batch}")
        self.save_hyperparameters(ignore=["student", "teacher", "codec", "text_encoder", "discriminator"],
                                  logger=False)
        self.automatic_optimization = False
        self.lora = LoraSettings.from_config(lora)
        self.activation_checkpointing = activation_checkpointing
        if self.lora.student:  # adapters on the student's own frozen base (TMD: the Stage-1 student, not the teacher)
            add_lora(student, self.lora, STUDENT)
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        if self.lora.fake_score:  # an adapter on the teacher's weights: one copy for teacher and fake score
            add_lora(teacher, self.lora, FAKE_SCORE)
            self.fake_score = AdapterView(teacher, FAKE_SCORE)
        else:
            self.fake_score = copy.deepcopy(teacher).requires_grad_(True).train()
        dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        if use_gan and discriminator is None:
            raise ValueError("use_gan=True needs a discriminator")
        self.discriminator = (discriminator(dim=dim) if isinstance(discriminator, partial) else discriminator) \
            if use_gan else None
        if vsd_reduction not in ("mean", "sum"):
            raise ValueError(f"vsd_reduction must be 'mean' or 'sum', got {vsd_reduction!r}")
        self.register_buffer("outer_grid", time_grid(M, grid_gamma, t_max).float(), persistent=False)
        self.iteration = 0
        self.micro_step = 0  # position inside the current update (0 .. accumulation_steps - 1)
        self._accumulation: int | None = None  # k, fixed at the first training step
        self._micro_stats: dict[str, torch.Tensor] = {}  # summed over the micro-steps of the current update
        self.ema_update_due = False  # read by the EMA callback: only student iterations change the student

    # -- what subclasses provide -----------------------------------------------------------------------------------
    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The student's clean sample x̂ from the noised data `x_t` at outer time t (gradients flow)."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.device.type == "cuda" and self.hparams.teacher_dtype:  # a LoRA fake score stays float32
            cast_keeping_adapters(self.teacher, getattr(torch, self.hparams.teacher_dtype))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        keep = {f"teacher.{k}" for k in adapter_parameters(self.teacher, FAKE_SCORE)}  # the LoRA fake score
        for key in [k for k in state if k.startswith("teacher.") and k not in keep]:
            del state[key]
        checkpoint["distill"] = {"iteration": self.iteration, "micro_step": self.micro_step, "rng": rng_state(),
                                 "rng_by_rank": gather_rng_states()}  # data-parallel ranks draw their own noise
        if self.lora.student:  # how `loading` rebuilds the adapter before merging it into a plain student
            checkpoint["tmd_lightning"]["lora"] = {"adapter": STUDENT, **self.lora.record()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("distill")
        if record is not None:
            self.iteration = int(record["iteration"])
            if int(record.get("micro_step", 0)):
                log.warning("checkpoint saved at micro-step %d of iteration %d: its partial gradients were not saved, "
                            "so that update restarts from its first micro-step", record["micro_step"], self.iteration)
            self.micro_step = 0
            restore_rng(record)

    def export_pretrained(self, path: str) -> bool:
        """The student as a diffusers folder plus `sampling.json`, which says how `sample` should run it.

        A LoRA student is exported merged (a plain network, loaded like any other). Under FSDP2 every rank calls
        this and rank 0 writes (returns whether this process wrote)."""
        if not self.lora.student:
            return super().export_pretrained(path)
        from tmd_lightning.checkpoints import write_sampling_record

        merged_copy(self.student).save_pretrained(path)
        write_sampling_record(path, self.sampler)
        return True

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer per trainable network: [student, fake score(, discriminator)]."""
        nets = [self.student, self.fake_score] + ([self.discriminator] if self.discriminator is not None else [])
        return [self.hparams.optimizer(params=[p for p in net.parameters() if p.requires_grad]) for net in nets]

    # -- shared pieces -------------------------------------------------------------------------------------------------
    def sample_from_data(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x̂: noise the data to a random outer-grid time t_i and let the student map it to a clean sample."""
        b, M = x.shape[0], self.hparams.M
        t = self.outer_grid[torch.randint(1, M + 1, (b,), device=x.device)]
        eps = torch.randn_like(x)
        return self.student_x0(interpolate(x, eps, t), t, eps, text)

    def sample_weights(self, x_hat: torch.Tensor) -> torch.Tensor:
        """The toy's shape weights of the student's samples, from their decoded pixels (no gradient)."""
        with torch.no_grad():
            return foreground_weights({"video": self.codec.decode(x_hat)}, self.codec, self.hparams.foreground_weight)

    def dmd_time(self, b: int) -> torch.Tensor:
        h = self.hparams
        return shift(torch.rand(b, device=self.device) * (h.dmd_t_max - h.dmd_t_min) + h.dmd_t_min, h.dmd_shift)

    def wan_velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return wan_velocity(net, x_t, t, text)

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """g_real: the teacher's x0 with CFG, the pair as one batched forward."""
        velocity = cfg_velocity(partial(self.wan_velocity, self.teacher), text, neg, self.hparams.cfg_scale)
        return x0_from_velocity(x_t, t, velocity(x_t, t))

    def teacher_features(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        return block_features(self.teacher, x_t, t, text, self.discriminator.feature_blocks)  # cast by `embed`

    def ensure_finite(self, name: str, value: torch.Tensor) -> None:
        """A NaN/inf stops the run with a message naming it and the last checkpoint with finite, bounded weights
        (callbacks/finite.py). The decision is collective: every rank stops when any rank sees a non-finite value,
        instead of one rank leaving the others waiting in a collective."""
        if not agreed(self._trainer, all_finite([value])):
            raise non_finite_error(self._trainer, f"{name} at iteration {self.iteration}")

    def _step(self, optimizer: torch.optim.Optimizer, net: nn.Module, name: str) -> None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None],
                                              self.hparams.grad_clip or float("inf"))
        if isinstance(norm, DTensor):  # FSDP2: the norm over all shards
            norm = norm.full_tensor()
        self.log(f"grad_norm/{name}", norm, batch_size=1)
        optimizer.step()

    # -- gradient accumulation -----------------------------------------------------------------------------------------
    def accumulation_steps(self, micro_batch: int) -> int:
        """k: micro-steps per update, `global_batch / (world size x micro_batch)`, fixed by the first batch."""
        if self._accumulation is None:
            world = self._trainer.world_size if self._trainer is not None else 1
            global_batch = self.hparams.global_batch
            if global_batch is None:
                self._accumulation = 1
            elif global_batch % (world * micro_batch):
                raise ValueError(f"stage.global_batch={global_batch} is not a multiple of world size {world} x "
                                 f"batch size {micro_batch} (data.batch_size is the per-rank micro batch)")
            else:
                self._accumulation = global_batch // (world * micro_batch)
        return self._accumulation

    @contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Backward passes inside reduce gradients across ranks only when `enabled` (always, without a data-parallel
        strategy). DDP: Lightning prepares the reducer only while `require_backward_grad_sync` is set (what
        `no_sync()` clears); FSDP2: `set_requires_gradient_sync` on every `fully_shard`-ed module."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        ddp = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(ddp, DistributedDataParallel):
            before, ddp.require_backward_grad_sync = ddp.require_backward_grad_sync, enabled
            try:
                yield
            finally:
                ddp.require_backward_grad_sync = before
            return
        units = [m for m in self.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(enabled, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def _hold_ddp_sync(self) -> None:
        """While accumulating under DDP, the wrapper's own forward (the whole `training_step`) runs without gradient
        sync, so DDP does not prepare its reducer for a backward after the step (a backward of the next micro-step
        would find it armed and reduce); `gradient_sync(True)` arms it for the last micro-step's backward only."""
        from torch.nn.parallel import DistributedDataParallel

        ddp = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(ddp, DistributedDataParallel):
            ddp.require_backward_grad_sync = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(ddp, DistributedDataParallel):
            ddp.require_backward_grad_sync = True  # DDP's default outside the accumulating steps

    def _backward(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """`manual_backward`, synchronised across ranks only at the last micro-step of an update."""
        if self._accumulation == 1:  # every backward synchronises, as without accumulation support
            self.manual_backward(tensor, *args, **kwargs)
            return
        with self.gradient_sync(self.micro_step == self._accumulation - 1):
            self.manual_backward(tensor, *args, **kwargs)

    def _log_update(self, stats: dict[str, torch.Tensor], batch_size: int) -> None:
        """Logs `stats` once per update: the mean over its micro-steps (with equal micro batches the losses equal
        those of the whole global batch; norms are the mean of the micro batches' norms)."""
        k = self._accumulation or 1
        if k == 1:
            self.log_dict({f"train/{name}": v for name, v in stats.items()}, batch_size=batch_size)
            return
        for name, v in stats.items():
            self._micro_stats[name] = self._micro_stats.get(name, 0.0) + v.detach()
        if self.micro_step == k - 1:
            self.log_dict({f"train/{name}": v / k for name, v in self._micro_stats.items()},
                          batch_size=batch_size * k)
            self._micro_stats = {}

    # -- the two kinds of iteration ------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.skip_empty_batch(batch):  # no sample: no iteration, the student/critic schedule waits
            self.ema_update_due = False
            return
        x, text = self.encode_batch(batch)
        k = self.accumulation_steps(x.shape[0])
        if k > 1:
            self._hold_ddp_sync()
        neg = self.negative_embedding(x.shape[0])
        optimizers = self.optimizers()
        student_turn = self.iteration % self.hparams.student_every == 0
        if student_turn:
            self.student_iteration(x, text, neg, optimizers[0])
        else:
            self.critic_iteration(x, text, optimizers[1], optimizers[2] if len(optimizers) > 2 else None)
        last = self.micro_step == k - 1
        self.micro_step = 0 if last else self.micro_step + 1
        self.ema_update_due = student_turn and last
        if not last:
            return
        self.iteration += 1
        self.log("train/phase_student", float(student_turn), batch_size=x.shape[0] * k)
        self.log("train/iteration", float(self.iteration), batch_size=x.shape[0] * k)
        if self.hparams.max_iterations is not None and self.iteration >= self.hparams.max_iterations:
            self.trainer.should_stop = True

    def student_iteration(self, x: torch.Tensor, text: torch.Tensor, neg: torch.Tensor,
                          optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """`L_vsd + λ L_gan`; both reach the student only through x̂, so their x̂-gradients are formed separately
        (their norms logged) and sent back through the student in one backward (one micro-step of the update when
        accumulating: the x̂-gradient scaled by 1/k, the step taken after the last)."""
        h, b = self.hparams, x.shape[0]
        x_hat = self.sample_from_data(x, text)
        t = self.dmd_time(b)
        x_hat_t = interpolate(x_hat, torch.randn_like(x_hat), t)
        with torch.no_grad():
            g_fake = x0_from_velocity(x_hat_t, t, self.wan_velocity(self.fake_score, x_hat_t, t, text))
            g_real = self.teacher_x0(x_hat_t, t, text, neg)
        self.ensure_finite("g_fake", g_fake)
        self.ensure_finite("g_real", g_real)
        loss_vsd = vsd_loss(x_hat, vsd_gradient(x_hat.detach(), g_fake, g_real), h.vsd_reduction)
        self.ensure_finite("loss_vsd", loss_vsd)
        (grad_x,) = torch.autograd.grad(loss_vsd, x_hat, retain_graph=True)
        stats = {"loss_vsd": loss_vsd.detach(), "grad_norm_x_hat_vsd": grad_x.norm()}
        if self.discriminator is not None:
            logits = self.discriminator(self.teacher_features(x_hat_t, t, text))  # backprop stops at the last block
            loss_gan = gan_generator_loss(logits)
            self.ensure_finite("loss_gan_generator", loss_gan)
            (grad_gan,) = torch.autograd.grad(h.gan_weight * loss_gan, x_hat, retain_graph=True)
            stats |= {"loss_gan_generator": loss_gan.detach(), "grad_norm_x_hat_gan": grad_gan.norm(),
                      "grad_ratio_gan_vsd": grad_gan.norm() / grad_x.norm().clamp_min(1e-12)}
            grad_x = grad_x + grad_gan
            stats["loss_student"] = loss_vsd.detach() + h.gan_weight * loss_gan.detach()
        k = self.accumulation_steps(b)
        if self.micro_step == 0:
            optimizer.zero_grad(set_to_none=True)
        self._backward(x_hat, gradient=(grad_x if k == 1 else grad_x / k).to(x_hat.dtype))
        if self.micro_step == k - 1:
            self._step(optimizer, self.student, "student")
        self._log_update(stats, b)
        return stats

    def critic_iteration(self, x: torch.Tensor, text: torch.Tensor, opt_fake: torch.optim.Optimizer,
                         opt_disc: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
        """Fake-score flow matching on detached student samples; the discriminator on fake vs noised real."""
        b = x.shape[0]
        with torch.no_grad():
            x_hat = self.sample_from_data(x, text)
        t = self.dmd_time(b)
        eps = torch.randn_like(x_hat)
        x_hat_t = interpolate(x_hat, eps, t)
        weight = self.sample_weights(x_hat) if self.hparams.foreground_weight > 0 else None
        loss_fake = flow_matching_loss(self.wan_velocity(self.fake_score, x_hat_t, t, text), x_hat, eps, weight)
        self.ensure_finite("loss_fake_score", loss_fake)
        stats = {"loss_fake_score": loss_fake.detach()}
        loss = loss_fake
        if self.discriminator is not None:
            x_t_real = interpolate(x, torch.randn_like(x), t)
            with torch.no_grad():  # one batched teacher pass for both branches
                features = self.teacher_features(torch.cat([x_hat_t, x_t_real]), torch.cat([t, t]),
                                                 torch.cat([text, text]))
            logits = self.discriminator(features)
            fake_logits, real_logits = zip(*(lg.chunk(2) for lg in logits), strict=True)
            loss_disc = gan_discriminator_loss(list(fake_logits), list(real_logits))
            self.ensure_finite("loss_discriminator", loss_disc)
            loss = loss + loss_disc
            stats |= {"loss_discriminator": loss_disc.detach(),
                      "disc_acc_real": torch.stack([(lg > 0).float().mean() for lg in real_logits]).mean(),
                      "disc_acc_fake": torch.stack([(lg < 0).float().mean() for lg in fake_logits]).mean()}
        k = self.accumulation_steps(b)
        if self.micro_step == 0:
            opt_fake.zero_grad(set_to_none=True)
            if opt_disc is not None:
                opt_disc.zero_grad(set_to_none=True)
        with self.fake_score.active() if self.lora.fake_score else nullcontext():  # checkpointed recompute
            self._backward(loss if k == 1 else loss / k)
        if self.micro_step == k - 1:
            self._step(opt_fake, self.fake_score, "fake_score")
            if opt_disc is not None:  # the raw optimizer: Lightning counts one global step per update, not per network
                self._step(getattr(opt_disc, "optimizer", opt_disc), self.discriminator, "discriminator")
        self._log_update(stats, b)
        return stats


class TMDDistillStage(DistillStage):
    """TMD Stage 2: x̂ = ε - InnerFlow(m_θ(x_ti, t_i)) with gradients through all N inner steps.

    Args:
        N: inner flow-head steps.
        rollout: False detaches the graph between inner steps (the paper's "no rollout" ablation).
        x_hat: "eps_minus_y" (x̂ = ε - ŷ, default) or "x_minus_ty" (x̂ = x_ti - t_i ŷ).
    """

    def __init__(self, *args: Any, N: int = 2, rollout: bool = True, x_hat: str = "eps_minus_y",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if x_hat not in X_HAT:
            raise ValueError(f"x_hat must be one of {X_HAT}, got {x_hat!r}")
        self.save_hyperparameters("N", "rollout", "x_hat", logger=False)
        h = self.hparams
        self.register_buffer("inner_grid", time_grid(N, h.grid_gamma, h.t_max).float(), persistent=False)
        self.sampler = TMDSampler(h.M, N, h.grid_gamma, h.t_max)

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        m = self.student.backbone(x_t, t, text)
        y_hat = self.student.inner_flow(m, self.inner_grid, torch.randn_like(x_t),
                                        detach_steps=not self.hparams.rollout)
        return eps - y_hat if self.hparams.x_hat == "eps_minus_y" else x0_from_velocity(x_t, t, y_hat)


class DMD2Stage(DistillStage):
    """The DMD2-v baseline: no flow head; the student is the full Wan model and x̂ = g(x_ti, t_i) = x_ti - t_i v."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        h = self.hparams
        self.sampler = FewStepSampler(h.M, h.grid_gamma, h.t_max)

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return x0_from_velocity(x_t, t, self.wan_velocity(self.student, x_t, t, text))

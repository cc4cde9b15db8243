"""The KD warm-up of the one-step DMD2-v baseline (the paper's Table 7), and the DMD2-v student's initialisation.

The paper starts its one-step DMD2-v from a student regressed on 10k teacher noise -> sample pairs (CFG 5, lr 7e-5);
multi-step DMD2-v and TMD start without one. `KDWarmupStage` trains that student on the pairs of
`python -m tmd_lightning.kd_pairs`; `dmd2_student` gives `experiment=distill_dmd2` its export when M = 1.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tmd_lightning.models import load_transformer
from tmd_lightning.models.wan_parts import wan_velocity
from tmd_lightning.sampling import FewStepSampler
from tmd_lightning.stages.base import VideoStage

KD_COMMANDS = ("python -m tmd_lightning.kd_pairs", "python -m tmd_lightning.fit experiment=kd_warmup")


class KDWarmupStage(VideoStage):
    """Regresses a Wan student's one-step map onto the teacher's samples: `x̂ = ε - t_max v_θ(ε, t_max, c)`,
    loss `MSE(x̂, x_teacher)`, where `x_teacher` is the teacher's sample (50 Euler steps, the model's CFG) from the
    same noise ε.

    `x̂` is the x0 parameterisation DMD2-v trains (`DMD2Stage.student_x0`) at the one-step grid's only time
    t_max = 0.999, and exactly what DMD2-v's one-step sampler computes from ε (`FewStepSampler` with M = 1),
    so the warm-up trains the map the distilled student then samples with. The teacher saw ε as pure noise (t = 1);
    the student sees it at t_max, as Wan was pretrained and as every student grid ends.

    "skip-layer 10" in the paper's KD settings is not explained there. Our reading: skip-layer guidance as Wan2.1's
    community samplers apply it (teacher block 10 left out of CFG's unconditional branch) while the pairs are made
    (`skip_layers` of `python -m tmd_lightning.kd_pairs`, off by default); it does not concern this stage.

    Batches come from the pair cache (`data=cache`): {"latents": teacher samples, "noise": ε, "text": embeddings}.

    Args:
        student: the Wan transformer, initialised from the teacher.
        t_max: the student's input time (the one-step grid's top, 0.999).
        grid_gamma: the grid shift when the exported student is sampled with M > 1 (M = 1 does not use it).
        activation_checkpointing: one activation checkpoint per Wan block (memory for compute).
        global_batch: videos per optimizer step over all GPUs (recorded only: `tmd_lightning.fit` turns it into
            Lightning's `accumulate_grad_batches`).
    """

    network_attr = "student"

    def __init__(self, student: nn.Module, codec: nn.Module, text_encoder: nn.Module, optimizer: partial | None,
                 scheduler: partial | None = None, negative_prompt: str = "", t_max: float = 0.999,
                 grid_gamma: float = 10.0, activation_checkpointing: bool = False,
                 global_batch: int | None = None) -> None:
        super().__init__(codec, text_encoder, negative_prompt)
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {t_max}")
        self.save_hyperparameters(ignore=["student", "codec", "text_encoder"], logger=False)
        self.student = student
        self.activation_checkpointing = activation_checkpointing
        self.sampler = FewStepSampler(M=1, gamma=grid_gamma, t_max=t_max)  # how `sample` runs the trained student

    def one_step(self, noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x̂ = g(ε, t_max) = ε - t_max v_θ(ε, t_max, c), with gradients; the velocity as the one-step sampler
        computes it (`wan_velocity`: timestep 1000 t, float32 whatever the weights' dtype)."""
        t_max = self.hparams.t_max
        t = torch.full((noise.shape[0],), t_max, device=noise.device, dtype=torch.float32)
        return noise - t_max * wan_velocity(self.student, noise, t, text)

    def kd_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """MSE between the one-step sample from the batch's noise and the teacher's sample from it."""
        if "noise" not in batch:
            raise KeyError("a KD batch needs the pairs' noise: train from a pair cache of `python -m "
                           "tmd_lightning.kd_pairs` (experiment=kd_warmup sets data=cache to it)")
        target, text = self.encode_batch(batch)
        return F.mse_loss(self.one_step(batch["noise"].float(), text), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.kd_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["noise"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The same loss on held-out pairs (deterministic: nothing is drawn)."""
        self.log("val/loss", self.kd_loss(batch), prog_bar=True, batch_size=batch["noise"].shape[0], sync_dist=True)


def dmd2_student(pretrained: str, M: int, kd_export: str, kd_warmup: bool | str = "auto") -> nn.Module:
    """The DMD2-v student's initialisation: the KD warm-up's exported student when `kd_warmup` says so, else the
    teacher (`pretrained`).

    Args:
        pretrained: the teacher's folder (the student's init without KD).
        M: the student's steps.
        kd_export: the KD warm-up's export (`logs/kd_warmup/latest/export/student`).
        kd_warmup: "auto" = only for M = 1 (the paper: the one-step DMD2-v starts from a KD warm-up, multi-step
            DMD2-v does not); True / False = always / never.
    """
    if kd_warmup not in ("auto", True, False):
        raise ValueError(f"kd_warmup must be auto, true or false, got {kd_warmup!r}")
    use_kd = M == 1 if kd_warmup == "auto" else kd_warmup
    if not use_kd:
        return load_transformer(pretrained)
    folder = Path(kd_export)
    if not (folder / "config.json").is_file():
        why = "the one-step DMD2-v (M = 1) starts from the KD warm-up" if kd_warmup == "auto" else \
            "stage.student.kd_warmup=true"
        raise FileNotFoundError(
            f"no KD warm-up export at {folder}: {why}. Run `{KD_COMMANDS[0]}` and then `{KD_COMMANDS[1]}` first "
            "(an interrupted KD run: `python -m tmd_lightning.export <its last.ckpt> <folder>`), point "
            "stage.student.kd_export at an export, or set stage.student.kd_warmup=false to start from the teacher")
    return load_transformer(folder)

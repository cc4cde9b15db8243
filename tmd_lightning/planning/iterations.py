"""The stages and modes the plan models, and the network calls each training iteration of a stage runs.

Columns are (stage, mode): Stage 1 (`adapt_head`) in full, Stage 2 (`distill`) and the DMD2-v baseline
(`distill_dmd2`) in full, LoRA on the fake score, and LoRA on both fake score and student. `iterations` turns a column
into its iteration kinds (docs/method.md §4-5), each the calls whose activations coexist.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tmd_lightning.planning.activations import Call, Iteration
from tmd_lightning.planning.counts import Counts
from tmd_lightning.planning.run_setup import Precision
from tmd_lightning.planning.shapes import Sizes
from tmd_lightning.planning.units import dtype_bytes

MODES = {"full": (False, False), "LoRA fake": (True, False), "LoRA both": (True, True)}  # (fake score, student)
COLUMNS = [("adapt_head", "full"), *[(s, m) for s in ("distill", "distill_dmd2") for m in MODES]]


def iterations(stage: str, mode: str, c: dict[str, Counts], s: Sizes, p: Precision,
               cfg: DictConfig) -> dict[str, Iteration]:
    """The iteration kinds of `stage` (docs/method.md §4-5) as calls with gradients: Stage 1's backbone + one head
    call; Stage 2's student iteration (student with the inner rollout, teacher on the GAN path up to its last
    feature block, discriminator) and critic iteration (fake score, discriminator on fake and real)."""
    lora_fake, lora_student = MODES[mode]
    b, L, H, N = int(cfg.micro_batch), s.num_layers, int(cfg.tmd.H), int(cfg.tmd.N)
    rank, teacher_mixed = int(cfg.lora.rank), dtype_bytes(cfg.frozen_dtype) == 2
    per_block = c["teacher"].lora_tensors // 2 // L
    host = c["student"] if stage != "distill_dmd2" else c["teacher"]
    base_linear = host.host_linear if lora_student and p.autocast else 0  # casts autograd keeps, per L blocks

    def student(blocks: int, **kw: Any) -> Call:
        return Call(blocks, b, True, p.mixed, lora=per_block if lora_student else 0, rank=rank,
                    frozen_fp32_linear=base_linear * blocks // L, **kw)

    grad_student = () if lora_student else ("student",)
    if stage == "adapt_head":
        calls = (student(L - H, embed=True), student(H, heads=1))
        return {"step": Iteration(calls, 2 * b, p.mixed, grad_networks=grad_student)}
    if stage == "distill":
        student_calls = (student(L - H, embed=True), *[student(H, heads=1)] * N)
    else:
        student_calls = (student(L, embed=True, output_head=True),)
    gan = bool(cfg.use_gan)
    teacher = Call(max(cfg.model.disc_blocks) + 1, b, False, teacher_mixed)
    fake = Call(L, b, True, teacher_mixed if lora_fake else p.mixed, embed=not lora_fake, output_head=True,
                lora=per_block if lora_fake else 0, rank=rank)
    disc = ("discriminator",) if gan else ()
    return {"student": Iteration(student_calls + ((teacher,) if gan else ()), 2 * b, teacher_mixed,
                                 b if gan else 0, grad_student + disc),
            "critic": Iteration((fake,), 2 * b, teacher_mixed, 2 * b if gan else 0,
                                (() if lora_fake else ("fake score",)) + disc)}

"""Stage-1 benchmark: TM-MF seconds per iteration and the TMD sampler's cost against the teacher's (toy, CPU).

    python benchmarks/adapt_head.py            # a few minutes on 2 CPU cores
    python benchmarks/adapt_head.py --quick    # smoke run, < 1 min

Every ratio is measured in this one run (the machine is shared and noisy). The networks are the shipped toy
teacher and a student built from it (`configs/model/toy.yaml`: H = 1 of L = 6); speed does not depend on how
trained they are. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from foundation import seconds_per_step, toy_batch, toy_codec, toy_guidance  # noqa: E402

from tmd_lightning.data.toy_world import all_captions  # noqa: E402
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder, build_student, load_transformer  # noqa: E402
from tmd_lightning.stages import AdaptHeadStage, TeacherStage  # noqa: E402


def _parts() -> tuple[OmegaConf, TextEncoder]:
    model_cfg = OmegaConf.load(ROOT / "configs" / "model" / "toy.yaml")
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=int(model_cfg.text_encoder.max_length),
                                               model_class=model_cfg.text_encoder.model_class)
    return model_cfg, text_encoder


def stages() -> tuple[TeacherStage, AdaptHeadStage]:
    """The shipped teacher, and Stage 1 with the paper's settings (configs/stage/adapt_head.yaml) around it."""
    model_cfg, text_encoder = _parts()
    cfg = OmegaConf.load(ROOT / "configs" / "stage" / "adapt_head.yaml")
    tmd = OmegaConf.load(ROOT / "configs" / "tmd" / "default.yaml")
    optimizer = partial(torch.optim.AdamW, lr=float(cfg.optimizer.lr), betas=tuple(cfg.optimizer.betas),
                        weight_decay=float(cfg.optimizer.weight_decay))
    codec = toy_codec()
    teacher = TeacherStage(load_transformer(pretrained=TOY_MODEL_DIR), codec, text_encoder, optimizer)
    student = build_student(teacher=str(TOY_MODEL_DIR), head_blocks=int(model_cfg.head_blocks), fusion=tmd.fusion)
    keys = ("cond_dropout", "s_shift", "s_min", "s_max", "p_r_equals_s", "cfg_scale", "fd_delta", "loss_c")
    stage1 = AdaptHeadStage(student, codec, text_encoder, optimizer, M=int(tmd.M), N=int(tmd.N),
                            **{k: float(cfg[k]) for k in keys})
    return teacher, stage1


def seconds_per_video(stage, captions: list[str], repeats: int, **sampler) -> float:
    stage.eval()
    seeds = list(range(len(captions)))
    stage.generate(captions[:2], seeds[:2], 9, 16, 16, **sampler)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        stage.generate(captions, seeds, 9, 16, 16, **sampler)
    return (time.perf_counter() - start) / (repeats * len(captions))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    warmup, steps = (1, 3) if args.quick else (3, 15)
    teacher, stage1 = stages()
    batch = toy_batch(args.batch_size)
    torch.manual_seed(0)
    sec_teacher = seconds_per_step(teacher, batch, warmup, steps)
    sec_stage1 = seconds_per_step(stage1, batch, warmup, steps)
    captions = all_captions()[: 8 if args.quick else 48]
    repeats = 1 if args.quick else 3
    w = toy_guidance()
    samplers = [("teacher", teacher, dict(steps=50, cfg=w)), ("teacher", teacher, dict(steps=1, cfg=w)),
                ("TMD", stage1, dict(M=2, N=2)), ("TMD", stage1, dict(M=1, N=2)), ("TMD", stage1, dict(M=2, N=4))]
    timed = [(name, opts, stage.sampler_nfe(**opts), seconds_per_video(stage, captions, repeats, **opts))
             for name, stage, opts in samplers]
    reference = timed[0][3]

    print(f"# tmd_lightning Stage-1 benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}, "
          f"{platform.machine()}")
    latents = " x ".join(map(str, stage1.codec.latent_shape(9, 16, 16)))
    print(f"- toy: 9 x 16 x 16 videos -> {latents} latents, L = {stage1.student.num_layers}, "
          f"H = {stage1.student.head_blocks}; batch {args.batch_size}; {steps} timed steps after {warmup} warm-up\n")
    print("| benchmark | setting | effective NFE | seconds | ratio |")
    print("|---|---|---:|---:|---:|")
    print(f"| training step | teacher flow matching | | {sec_teacher:.3f} | 1.00 |")
    print(f"| training step | Stage 1 TM-MF (M2 N2, CFG target, FD du/ds) | | {sec_stage1:.3f} | "
          f"{sec_stage1 / sec_teacher:.2f} |")
    for name, opts, nfe, sec in timed:  # ratio: how many times faster than the teacher's 50 x 2
        setting = ", ".join(f"{k}={v}" for k, v in opts.items())
        print(f"| sampling, per video | {name} {setting} | {nfe:.2f} | {sec:.4f} | {reference / sec:.1f}x |")


if __name__ == "__main__":
    main()

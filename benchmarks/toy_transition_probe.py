"""Does a TMD student sample its last transition, or predict its mean? Real toy videos noised to t_1, stepped to 0.

    python benchmarks/toy_transition_probe.py --student logs/adapt_head/latest/export/student
    python benchmarks/toy_transition_probe.py --student logs/distill/latest/export/student

Real held-out toy videos (every caption, rendered here: no files needed) are noised to the student's last outer
time t_1 (its grid: M, gamma) and taken to t = 0 by

1. the shipped teacher's Euler sampler in k steps over [0, t_1] (grid shift 3), with and without the toy's guidance:
   1 step is the posterior mean `E[x | x_t1]` (blurred edges), many steps a sample of the transition the student's
   flow head is meant to draw;
2. the student's last outer step (its flow head, N inner steps), twice with different inner noise y1: how much the
   head's output depends on y1 (a head that only predicts the mean ignores it);
3. the student's full M-step sampler from noise, for reference;
4. the flow head alone: its error against the true inner target y = eps - x from the inner sample
   y_s = (1 - s) y + s y1 at r = s, with the caption and with the negative prompt. At small s, y_s is y plus a
   little noise: a head that reads its inner sample reaches an error near 0 there, one that ignores it stays at
   the posterior mean's error (the s = 0.999 row).

Shape is the attribute the toy's students lose (colour and direction are 1.000), so the table reports the toy
classifier's shape accuracy. A student whose last step scores like the teacher's 1-step row has learned the mean
of the transition, not the transition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.toy_shape_probe import real_videos  # noqa: E402
from tmd_lightning.checkpoints import load_checkpoint_stage, load_pretrained_stage  # noqa: E402
from tmd_lightning.data.toy_world import SHAPES, parse_caption  # noqa: E402
from tmd_lightning.flow import interpolate, shift  # noqa: E402
from tmd_lightning.metrics.toy import classify  # noqa: E402
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder  # noqa: E402
from tmd_lightning.models.wan_parts import wan_velocity  # noqa: E402
from tmd_lightning.sampling import cfg_velocity, euler_sample, student_grids, tmd_sample  # noqa: E402

TEACHER_STEPS = (1, 2, 4, 25)
INNER_TIMES = (0.999, 0.75, 0.5, 0.25, 0.05)


def shape_accuracy(videos: torch.Tensor, captions: list[str]) -> float:
    """Share of videos whose classified shape is the caption's."""
    return float(np.mean([p["shape"] == parse_caption(c)["shape"]
                          for p, c in zip(classify(videos), captions, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="an exported TMD student folder or a stage .ckpt")
    parser.add_argument("--M", type=int, default=2)
    parser.add_argument("--N", type=int, default=2)
    parser.add_argument("--gamma", type=float, default=None, help="student grid shift (default: the toy model's)")
    parser.add_argument("--per-caption", type=int, default=2)
    args = parser.parse_args()
    model_cfg = OmegaConf.load(ROOT / "configs" / "model" / "toy.yaml")
    gamma = args.gamma if args.gamma is not None else float(model_cfg.student_grid_gamma)
    codec = instantiate(model_cfg.codec)
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    load = load_checkpoint_stage if args.student.endswith(".ckpt") else load_pretrained_stage
    student = load(args.student, codec, text_encoder).eval().network
    teacher_stage = load_pretrained_stage(TOY_MODEL_DIR, codec, text_encoder).eval()
    teacher = teacher_stage.network
    outer, inner = student_grids(args.M, args.N, gamma)
    t1 = float(outer[1])
    videos, captions = real_videos(SHAPES, args.per_caption, seed=1)
    torch.manual_seed(0)  # the full sampler draws its inner noise from the global generator
    b = len(captions)
    print(f"student: {args.student} (M={args.M}, N={args.N}, grid shift {gamma:g}: t_1 = {t1:.3f}); "
          f"{b} real videos noised to t_1\n")
    print("| from | model | steps to 0 | shape accuracy |\n|---|---|---|---:|")
    print(f"| - | real videos | - | {shape_accuracy(videos, captions):.3f} |")
    with torch.inference_mode():
        x, text = codec.encode(videos).float(), text_encoder(captions).float()
        neg = teacher_stage.negative_embedding(b)
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        x_t1 = interpolate(x, eps, torch.full((b,), t1))
        for cfg in (1.0, float(model_cfg.guidance_scale)):
            velocity = cfg_velocity(lambda a, s, c: wan_velocity(teacher, a, s, c), text, neg, cfg)
            for k in TEACHER_STEPS:
                grid = shift(torch.linspace(0, 1, k + 1), 3.0) * t1
                acc = shape_accuracy(codec.decode(euler_sample(velocity, x_t1, grid)), captions)
                print(f"| real x_t1 | teacher, Euler, CFG {cfg:g} | {k} | {acc:.3f} |")
        tt = torch.full((b,), t1)
        m = student.backbone(x_t1, tt, text)
        gen = torch.Generator().manual_seed(1)
        steps = [x_t1 - t1 * student.inner_flow(m, inner.float(), torch.randn(x.shape, generator=gen))
                 for _ in range(2)]
        acc = shape_accuracy(codec.decode(steps[0]), captions)
        print(f"| real x_t1 | student, last outer step | 1 (N={args.N}) | {acc:.3f} |")
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        acc = shape_accuracy(codec.decode(tmd_sample(student, noise, text, args.M, args.N, gamma)), captions)
        print(f"| noise | student, M={args.M} N={args.N} | {args.M} | {acc:.3f} |")
        spread = float((steps[0] - steps[1]).abs().mean())
        print(f"\nThe student's last step with two inner noises y1: mean |difference| {spread:.4f} per latent element "
              f"(data mean |x| {float(x.abs().mean()):.4f}).")
        y = eps - x  # the inner target of x_t1's transition
        m_neg = student.backbone(x_t1, tt, neg)
        print("\n| inner time s | mse(head, y), caption | mse(head, y), negative prompt |\n|---:|---:|---:|")
        for s_value in INNER_TIMES:
            s = torch.full((b,), s_value)
            y_s = interpolate(y, torch.randn(x.shape, generator=gen), s)
            errors = [float((student.head(y_s, s, s, feats) - y).pow(2).mean()) for feats in (m, m_neg)]
            print(f"| {s_value:g} | {errors[0]:.4f} | {errors[1]:.4f} |")
        errors = [float((wan_velocity(teacher, x_t1, tt, c) - y).pow(2).mean()) for c in (text, neg)]
        print(f"| teacher v(x_t1) (the head at init, at s = t) | {errors[0]:.4f} | {errors[1]:.4f} |")


if __name__ == "__main__":
    main()

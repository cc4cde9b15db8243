"""First-GPU check (`bash benchmarks/gpu_check.sh`): the four things a CPU cannot show, in one run of a few minutes.

    bash benchmarks/gpu_check.sh            # CUDA: a few minutes on one H200 (sections b-d); (a) needs 2 GPUs
    bash benchmarks/gpu_check.sh --tiny     # CPU, tiny widths and video: every code path in about a minute (CI)

(a) the 2-process FSDP2 tests (meta-device init with rank-0 broadcast, bf16 MixedPrecisionPolicy:
    tests/stages/test_meta_init.py) on NCCL, when 2 GPUs are visible; skipped otherwise (and with --tiny);
(b) seconds per video of the teacher (50 Euler steps x CFG: NFE 100) against the TMD sampler at M=2 N=2 and M=1 N=4,
    Wan2.1 1.3B architecture (random weights: speed does not depend on them), 81 x 480 x 832, bf16: the measured
    speed-up beside 100 / effective NFE;
(c) one Stage-1 step and one Stage-2 (TMD) student and critic iteration at 1.3B, 81 frames, activation
    checkpointing: seconds and peak memory beside the plan's figure (`benchmarks/scale.py`'s benchmarks, reused);
(d) Stage 1's finite-difference du/ds on real-size activations (the 1.3B student's head, 81 x 480 x 832 latents):
    the FD head passes under bf16 autocast (`stage.fd_full_precision=false`) against float32 passes (the default),
    as the relative difference of the two du/ds (README "Precision": 2-66 % on a tiny Wan, unmeasured at scale).

Each section prints a table; a failing section prints its error and the others still run; the exit code is the
number of failed sections (0: all passed). Nothing downloads and no weights are read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402  (benchmarks/scale.py: the real-scale benchmark these sections reuse)

from tmd_lightning.losses import finite_difference_ds  # noqa: E402
from tmd_lightning.models import TMDTransformer  # noqa: E402
from tmd_lightning.sampling import cfg_velocity, effective_nfe, teacher_sample, tmd_sample  # noqa: E402


def section_a(args: argparse.Namespace, device: torch.device) -> str:
    """The 2-process FSDP2 tests on NCCL (2 GPUs), else skipped."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if args.tiny or gpus < 2:
        return f"skipped: {gpus} GPU(s) visible{' (--tiny)' if args.tiny else ''}; needs 2 for NCCL"
    env = dict(os.environ, TMD_DIST_DEVICE="cuda")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/stages/test_meta_init.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    if proc.returncode:
        raise RuntimeError(f"NCCL 2-process tests failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return f"| 2-process FSDP2 tests on NCCL | {tail} |"


def section_b(cfg: Any, args: argparse.Namespace, device: torch.device) -> str:
    """Teacher 50 x 2 against TMD M=2 N=2 and M=1 N=4: seconds per video and the speed-up beside 100 / NFE."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = scale.build_teacher(cfg, device).to(dtype).eval()
    H, L = int(cfg.tmd.H), teacher.config.num_layers
    student = TMDTransformer.from_teacher(teacher, head_blocks=H).to(dtype).eval()
    noise, text = scale.batch(cfg, args, args.sample_frames, device)
    noise, text = noise[:1].to(dtype), text[:1].to(dtype)
    neg = torch.randn_like(text)

    def velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return teacher(x.to(dtype), timestep=t * 1000.0, encoder_hidden_states=c.to(dtype), return_dict=False)[0]

    def timed(fn: Any) -> float:
        with torch.no_grad():
            fn()  # warm-up (kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    steps = args.teacher_steps
    teacher_nfe = effective_nfe(steps, cfg=True)
    rows = [("teacher Euler", f"{steps} x 2 (CFG 5)", teacher_nfe,
             timed(lambda: teacher_sample(cfg_velocity(velocity, text, neg, 5.0), noise, steps)))]
    for M, N in ((2, 2), (1, 4)):
        rows.append(("TMD", f"M={M} N={N}", effective_nfe(M, N, H, L),
                     timed(lambda M=M, N=N: tmd_sample(student, noise, text, M, N))))
    lines = ["| sampler | setting | effective NFE | s / video | speed-up | 100 / NFE |",
             "|---|---|---:|---:|---:|---:|"]
    for name, setting, nfe, seconds in rows:
        lines.append(f"| {name} | {setting} | {nfe:.2f} | {seconds:.3f} | {rows[0][3] / seconds:.1f}x | "
                     f"{teacher_nfe / nfe:.1f}x |")
    return "\n".join(lines)


def section_c(cfg: Any, args: argparse.Namespace, device: torch.device) -> str:
    """One Stage-1 step, one Stage-2 student and critic iteration: seconds and peak memory beside the plan."""
    estimate = scale.planner(cfg, True)
    rows = scale.bench_adapt_head(cfg, args, device, estimate)
    scale.empty(device)
    rows += [r for r in scale.bench_distill("TMD", cfg, args, device, estimate) if "mean" not in r["setting"]]
    scale.empty(device)
    return scale.table(rows, "MiB" if args.tiny else "GiB")


def section_d(cfg: Any, args: argparse.Namespace, device: torch.device) -> str:
    """du/ds of Stage 1's finite difference: bf16 autocast and float32 FD passes against a float32 reference."""
    teacher = scale.build_teacher(cfg, device)
    with torch.no_grad():
        teacher.proj_out.weight.normal_(std=0.02)  # a non-trivial head output at random init
    H = int(cfg.tmd.H)
    student = TMDTransformer.from_teacher(teacher, head_blocks=H).eval()
    del teacher
    torch.manual_seed(0)
    x, text = scale.batch(cfg, args, args.frames, device)
    b = x.shape[0]
    t, s, r = torch.full((b,), 0.6, device=device), torch.full((b,), 0.5, device=device), torch.full((b,), 0.2,
                                                                                                    device=device)
    y1, y = torch.randn_like(x), torch.randn_like(x)
    y_s, v = (1 - s.view(-1, 1, 1, 1, 1)) * y + s.view(-1, 1, 1, 1, 1) * y1, y1 - y
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with torch.no_grad():
        with autocast:
            m = student.backbone(x, t, text)  # as Stage 1: the backbone under bf16 autocast
        m32 = m.to(torch.float32) if hasattr(m, "to") else m

        def du(delta: float, mixed: bool) -> torch.Tensor:
            def u_fn(samples: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
                mm = (m if mixed else m32).repeat(2)
                return student.average_velocity(samples, s_, r.repeat(2), mm, y1.repeat(2, 1, 1, 1, 1))

            with autocast if mixed else torch.autocast(device.type, enabled=False):
                return finite_difference_ds(u_fn, y_s, s, v, delta).float()

        full = du(args.fd_delta, False)  # what Stage 1 computes by default (fd_full_precision=true)
        rows = [("bf16 autocast FD passes (fd_full_precision=false)", du(args.fd_delta, True))]
    norm = full.norm()
    lines = [f"| du/ds, δ = {args.fd_delta:g}, {tuple(x.shape)} latents | relative difference vs float32 FD passes |",
             "|---|---:|"]
    for name, value in rows:
        lines.append(f"| {name} | {((value - full).norm() / norm).item():.2%} |")
    lines.append(f"| (float32 FD passes: RMS du/ds = {(norm / full.numel() ** 0.5).item():.3g}) | |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny widths and video (what CI runs)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--only", default="abcd", help="sections to run, e.g. --only bd")
    args = parser.parse_args(argv)
    smoke = ["--smoke"] if args.tiny else []
    base = scale.parse([*smoke, "--frames", "81", "--sample-frames", "81", "--warmup", "0", "--repeats", "1"])
    for key, value in vars(base).items():
        setattr(args, key, value)
    args.teacher_steps = 50
    args.fd_delta = 5e-3
    args.model = "wan2.1_t2v_1.3b"
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the sections; returns the number that failed."""
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print("no GPU: the real-size check would take hours on a CPU; use --tiny")
        return 1
    torch.manual_seed(0)
    cfg = scale.plan_config(args, device)
    start = time.perf_counter()
    print(f"# GPU check: {scale.device_name(device)}, torch {torch.__version__}"
          f"{' (--tiny: tiny widths, 5 x 32 x 32 video)' if args.tiny else ''}")
    sections = {"a": ("(a) 2-process FSDP2 tests on NCCL", lambda: section_a(args, device)),
                "b": ("(b) sampling speed: teacher 50 x 2 vs TMD", lambda: section_b(cfg, args, device)),
                "c": ("(c) one Stage-1 step, one Stage-2 student / critic iteration (checkpointing)",
                      lambda: section_c(cfg, args, device)),
                "d": ("(d) Stage-1 du/ds: bf16 vs float32 FD passes", lambda: section_d(cfg, args, device))}
    failed = []
    for key, (title, fn) in sections.items():
        if key not in args.only:
            continue
        print(f"\n## {title}\n", flush=True)
        t0 = time.perf_counter()
        try:
            print(fn())
        except Exception:  # report and go on: one broken section must not hide the others
            traceback.print_exc(file=sys.stdout)
            failed.append(key)
        print(f"\n({time.perf_counter() - t0:.1f} s)", flush=True)
        scale.empty(device)
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s; "
          + (f"FAILED sections: {', '.join(failed)}" if failed else "all sections passed"))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

"""Toy-world quality against cost: joint accuracy, toy-FD, effective NFE and seconds per video for the teacher's
samplers and a TMD student's, on the same 48 prompts x 4 seeds (the numbers in the README's tables).

    python benchmarks/toy_quality.py                   # teacher + the latest adapt_head, distill, distill_dmd2
    python benchmarks/toy_quality.py --model "mine=PATH"  # any student: a stage .ckpt or an exported folder
    python benchmarks/toy_quality.py --quick              # 8 prompts x 1 seed, smoke run

Rows: the teacher at 50 x 2 (Euler, CFG 5), the teacher at about the students' effective NFE (1 step with CFG and
2 steps without: NFE 2; 2 steps with CFG: NFE 4), then each student's sampler: TMD at several (M, N), DMD2-v at
several M. Default students are the exports of the latest runs under logs/ (missing ones are skipped, said so).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tmd_lightning.data.toy_world import all_captions, generate_toy_dataset  # noqa: E402
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder  # noqa: E402
from tmd_lightning.sample import toy_report  # noqa: E402
from tmd_lightning.stages.loading import load_checkpoint_stage, load_pretrained_stage  # noqa: E402

TEACHER_ROWS = [dict(steps=50, cfg=5.0), dict(steps=1, cfg=5.0), dict(steps=2, cfg=1.0), dict(steps=2, cfg=5.0)]
TMD_ROWS = [dict(M=1, N=2), dict(M=2, N=2), dict(M=2, N=4)]
FEW_STEP_ROWS = [dict(M=1), dict(M=2), dict(M=4)]
DEFAULT_MODELS = [f"{label}={ROOT / 'logs' / task / 'latest' / 'export' / 'student'}" for label, task in
                  [("TMD, Stage 1 only", "adapt_head"), ("TMD (distill)", "distill"), ("DMD2-v", "distill_dmd2")]]


def load(source: str | Path, text_encoder: TextEncoder):
    codec = PixelCodec(int(OmegaConf.load(ROOT / "configs" / "model" / "toy.yaml").codec.patch))
    if str(source).endswith(".ckpt"):
        return load_checkpoint_stage(source, codec, text_encoder).eval()
    return load_pretrained_stage(source, codec, text_encoder).eval()


def evaluate(stage, captions: list[str], seeds: list[int], reference: Path, batch_size: int, **sampler) -> dict:
    pairs = [(c, s) for c in captions for s in seeds]
    start = time.perf_counter()
    videos = torch.cat([stage.generate([c for c, _ in pairs[i : i + batch_size]],
                                       [s for _, s in pairs[i : i + batch_size]], 9, 16, 16, **sampler).cpu()
                        for i in range(0, len(pairs), batch_size)])
    seconds = (time.perf_counter() - start) / len(pairs)
    return toy_report(videos, [c for c, _ in pairs], reference) | {
        "nfe": stage.sampler_nfe(**sampler), "seconds": seconds, "videos": len(pairs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TOY_MODEL_DIR))
    parser.add_argument("--model", action="append", default=None, metavar="LABEL=PATH",
                        help="a student to score (stage .ckpt or exported folder); repeatable")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    captions, seeds = (all_captions()[::6], [0]) if args.quick else (all_captions(), [0, 1, 2, 3])
    reference = generate_toy_dataset(Path(args.data_dir) / "toy_9x16x16", 4, 9, 16, seed=1, split="reference")
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    rows = [("teacher", opts, evaluate(load(args.teacher, text_encoder), captions, seeds, reference,
                                       args.batch_size, **opts)) for opts in TEACHER_ROWS]
    sources = []
    for spec in args.model or DEFAULT_MODELS:
        label, _, path = spec.partition("=")
        if not Path(path).exists():
            print(f"skipping {label}: {path} does not exist", file=sys.stderr)
            continue
        sources.append(f"{label}: {path}")
        student = load(path, text_encoder)
        grid = TMD_ROWS if "N" in student.sampler_defaults else FEW_STEP_ROWS
        rows += [(label, opts, evaluate(student, captions, seeds, reference, args.batch_size, **opts))
                 for opts in grid]
    base = rows[0][2]["seconds"]
    print(f"# toy quality vs cost{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {platform.machine()}")
    print(f"- teacher: {args.teacher}")
    for source in sources:
        print(f"- {source}")
    print(f"- {len(captions)} prompts x {len(seeds)} seeds; toy-FD against {rows[0][2]['toy_fd_real_count']} "
          "held-out real videos\n")
    print("| model | sampler | effective NFE | joint acc | colour | shape | direction | toy-FD | s/video | "
          "speed-up vs 50x2 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, opts, r in rows:
        sampler = (f"Euler {opts['steps']} steps, CFG {opts['cfg']:g}" if "steps" in opts
                   else f"TMD M={opts['M']}, N={opts['N']}" if "N" in opts else f"DMD2-v {opts['M']} steps")
        print(f"| {name} | {sampler} | {r['nfe']:.2f} | {r['acc_joint']:.3f} | {r['acc_colour']:.3f} | "
              f"{r['acc_shape']:.3f} | {r['acc_direction']:.3f} | {r['toy_fd']:.4f} | {r['seconds']:.4f} | "
              f"{base / r['seconds']:.0f}x |")


if __name__ == "__main__":
    main()

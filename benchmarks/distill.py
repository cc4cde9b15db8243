"""Stage-2 benchmark: seconds per critic and per student iteration, TMD vs DMD2-v, and where the time goes (toy, CPU).

    python benchmarks/distill.py              # about two minutes on 2 CPU cores
    python benchmarks/distill.py --quick      # smoke run

Networks: the shipped toy teacher (teacher, fake score, DMD2-v student) and a TMD student built from it (H = 1 of
L = 6; speed does not depend on its training); discriminator heads of width 64 at blocks (3, 4, 5), as
`experiment=distill`. The share of each network is its forward time (timed with forward hooks); backward passes,
optimizer steps and the rest are one remaining column, since autograd does not attribute them to modules.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from foundation import toy_batch, toy_codec  # noqa: E402

from tmd_lightning.models import (  # noqa: E402
    TOY_MODEL_DIR,
    Discriminator,
    TextEncoder,
    build_student,
    load_transformer,  # noqa: E402
)
from tmd_lightning.stages import DMD2Stage, TMDDistillStage  # noqa: E402

NETWORKS = ("student", "teacher", "fake_score", "discriminator")


def build(kind: str, text_encoder: TextEncoder):
    teacher = load_transformer(pretrained=TOY_MODEL_DIR)
    disc = partial(Discriminator, feature_blocks=(3, 4, 5), hidden_dim=64)
    optimizer = partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    if kind == "TMD":
        student = build_student(teacher=str(TOY_MODEL_DIR), head_blocks=1)
        stage = TMDDistillStage(student, teacher, toy_codec(), text_encoder, optimizer, disc, N=2)
    else:
        stage = DMD2Stage(load_transformer(pretrained=TOY_MODEL_DIR), teacher, toy_codec(), text_encoder,
                          optimizer, disc)
    opts = stage.configure_optimizers()
    stage.optimizers = lambda: opts  # outside a Trainer: the stage's own iteration methods, no Lightning loop
    stage.log = stage.log_dict = lambda *a, **k: None
    stage.manual_backward = lambda tensor, *a, **k: tensor.backward(*a, **k)
    return stage.train(), opts


class ForwardTimer:
    """Wall-clock forward time per network (outermost call only, so the head inside the student is not counted
    twice); the student's `backbone`/`head` are wrapped too, because TMD calls them directly."""

    def __init__(self, stage) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)
        for name in NETWORKS:
            net = getattr(stage, name)
            net.register_forward_pre_hook(lambda *a, n=name: self._enter(n))
            net.register_forward_hook(lambda *a, n=name: self._exit(n))
            if hasattr(net, "backbone"):
                for method in ("backbone", "head"):
                    setattr(net, method, self._wrap(name, getattr(net, method)))
        self._start: dict[str, float] = {}
        stage.teacher_features = self._wrap("teacher", stage.teacher_features)  # blocks only: no forward() call

    def _enter(self, name: str) -> None:
        if self._depth[name] == 0:
            self._start[name] = time.perf_counter()
        self._depth[name] += 1

    def _exit(self, name: str) -> None:
        self._depth[name] -= 1
        if self._depth[name] == 0:
            self.seconds[name] += time.perf_counter() - self._start[name]

    def _wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            self._enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit(name)

        return wrapped


def time_iterations(stage, opts, batch: dict, kind: str, warmup: int, repeats: int) -> dict[str, dict]:
    x, text = stage.encode_batch(batch)
    neg = stage.negative_embedding(x.shape[0])
    runs = {"student": lambda: stage.student_iteration(x, text, neg, opts[0]),
            "critic": lambda: stage.critic_iteration(x, text, opts[1], opts[2])}
    timer = ForwardTimer(stage)
    out = {}
    for phase, fn in runs.items():
        for _ in range(warmup):
            fn()
        timer.seconds.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        total = (time.perf_counter() - start) / repeats
        out[phase] = {"seconds": total, **{n: timer.seconds[n] / repeats for n in NETWORKS}}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    warmup, repeats = (1, 1) if args.quick else (2, 6)
    torch.manual_seed(0)
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    batch = toy_batch(args.batch_size)
    results = {}
    for kind in ("TMD", "DMD2-v"):
        stage, opts = build(kind, text_encoder)
        results[kind] = time_iterations(stage, opts, batch, kind, warmup, repeats)
    print(f"# tmd_lightning Stage-2 benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}, {platform.machine()}")
    print(f"- toy, batch {args.batch_size}, mean of {repeats} iterations after {warmup} warm-up; TMD M2 N2 H1 of L6, "
          "DMD2-v M2; TTUR: one student iteration per four critic iterations\n")
    print("| method | iteration | seconds | student fwd | teacher fwd | fake score fwd | discriminator fwd | "
          "backward + optimizer + rest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind, phases in results.items():
        for phase, r in phases.items():
            shares = [r[n] / r["seconds"] for n in NETWORKS]
            print(f"| {kind} | {phase} | {r['seconds']:.3f} | " + " | ".join(f"{s:.0%}" for s in shares)
                  + f" | {1 - sum(shares):.0%} |")
        mean = (phases["student"]["seconds"] + 4 * phases["critic"]["seconds"]) / 5
        print(f"| {kind} | mean over a TTUR cycle | {mean:.3f} | | | | | |")


if __name__ == "__main__":
    main()

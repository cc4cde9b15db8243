"""Real-scale benchmark: seconds per iteration and peak memory of Stage 1 and Stage 2 (TMD and DMD2-v) with Wan2.1
1.3B-shaped networks, and the TMD sampler's seconds per video against the teacher's 50 x 2, on one GPU.

    python benchmarks/scale.py                                   # any CUDA GPU (1.3B shape, 21-frame training)
    python benchmarks/scale.py --frames 81 --output docs/gpu_benchmark.md    # append the table to the docs
    python benchmarks/scale.py --smoke                           # CPU, tiny widths: a few seconds (CI)

Weights are random (speed and memory do not depend on them): the teacher is built from `model.architecture`
(configs/model/*.yaml), the TMD student with `TMDTransformer.from_teacher`, and the stages are the project's own
(`AdaptHeadStage`, `TMDDistillStage`, `DMD2Stage`) driven outside a Trainer as benchmarks/distill.py does, under bf16
autocast (Lightning's bf16-mixed: float32 trainable weights) with the teacher cast to bf16 on a GPU (as the stage's
`setup` does).
Text embeddings are random (512 x 4096 per caption), latents are random (no VAE, no text encoder on the GPU).
Training rows run one video per iteration with activation checkpointing on every Wan network (`--no-checkpointing`
to turn it off). Peak memory is `torch.cuda.max_memory_allocated` over the timed iterations (on CPU: the bytes of
the stage's parameters, gradients and optimizer states plus the peak of the tensors the iteration allocates, from
`planning.TensorBytes`); "plan" is `python -m tmd_lightning.plan`'s estimate of the same iteration. Sampling rows run
the bf16 networks under no_grad and exclude VAE decoding.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tmd_lightning import planning  # noqa: E402
from tmd_lightning.config import CONFIG_DIR, register_resolvers  # noqa: E402
from tmd_lightning.models import Discriminator, TMDTransformer  # noqa: E402
from tmd_lightning.models.codecs import Codec  # noqa: E402
from tmd_lightning.sampling import cfg_velocity, effective_nfe, teacher_sample, tmd_sample  # noqa: E402
from tmd_lightning.stages import AdaptHeadStage, DMD2Stage, TMDDistillStage  # noqa: E402

register_resolvers()  # the configs use ${tmd_asset:...} and ${tmd_one_step:...}

# --smoke: the 1.3B layout at tiny widths, so CPU runs every code path in seconds
SMOKE = ["model.architecture.num_attention_heads=2", "model.architecture.attention_head_dim=16",
         "model.architecture.ffn_dim=64", "model.architecture.num_layers=4", "model.architecture.text_dim=32",
         "model.architecture.freq_dim=32", "model.text_encoder.max_length=8", "model.head_blocks=1",
         "model.disc_blocks=[1,2,3]", "discriminator_hidden_dim=16"]


class LatentCodec(Codec):
    """The Wan VAE's latent geometry without the VAE: the benchmark feeds latents directly."""

    latent_channels, temporal_factor, spatial_factor = 16, 4, 8


class RandomText(nn.Module):
    """Stands in for the text encoder: one fixed random embedding per call (the negative prompt)."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embedding", torch.randn(1, length, dim), persistent=False)

    def forward(self, captions: list[str]) -> torch.Tensor:
        return self.embedding.expand(len(captions), -1, -1)


def plan_config(args: argparse.Namespace, device: torch.device) -> Any:
    """The `plan` config of this benchmark: its model, video size and micro-batch on one device, no encoders;
    bf16-mixed with a bf16 teacher on a GPU, float32 on CPU (as the stages run there)."""
    precision = ["trainer.precision=bf16-mixed"] if device.type == "cuda" else \
        ["trainer.precision=32-true", "frozen_dtype=float32"]
    overrides = [f"model={args.model}", f"video.num_frames={args.frames}", f"video.height={args.height}",
                 f"video.width={args.width}", f"micro_batch={args.batch}", "strategy=single", "encoders_on_gpu=false",
                 "paths.output_dir=.", *precision, *(SMOKE if args.smoke else [])]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("plan", overrides=overrides)


def planner(cfg: Any, checkpointing: bool) -> Callable[[str], dict[str, float]]:
    """`plan`'s per-device peak of each iteration kind of a stage (full mode) in this benchmark's setting."""
    networks = planning.build_networks(cfg)
    counts = planning.count_all(networks, cfg.lora)
    sizes = planning.sizes(cfg, LatentCodec(), planning.wan_architecture(cfg.model))
    setup = planning.Setup("single", 1, planning.parse_precision(cfg.trainer.precision))
    return lambda stage: planning.iteration_totals(stage, "full", counts, sizes, setup, cfg, checkpointing)


def build_teacher(cfg: Any, device: torch.device) -> nn.Module:
    """A float32 Wan transformer with random weights, initialised directly on `device`."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        return WanTransformer3DModel(**planning.wan_architecture(cfg.model))


def checkpointed(*nets: nn.Module, enabled: bool) -> None:
    """Activation checkpointing per Wan block (diffusers' gradient checkpointing, which `run_blocks` honours)."""
    for net in nets:
        wan = getattr(net, "wan", net)
        if enabled:
            wan.enable_gradient_checkpointing()


def outside_trainer(stage: Any, optimizers: list[torch.optim.Optimizer]) -> Any:
    """The stage's own iteration methods without a Trainer (as benchmarks/distill.py): no logging, plain backward."""
    stage.optimizers = lambda: optimizers
    stage.log = stage.log_dict = lambda *a, **k: None
    stage.manual_backward = lambda tensor, *a, **k: tensor.backward(*a, **k)
    return stage.train()


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
            static: Callable[[], int]) -> tuple[float, float]:
    """Mean seconds of `fn` after `warmup` calls, and its peak memory in bytes (see the module docstring)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats, float(torch.cuda.max_memory_allocated())
    seconds = (time.perf_counter() - start) / repeats
    with planning.TensorBytes() as tracker:
        fn()
    return seconds, float(static() + tracker.peak)


def state_bytes(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of parameters, buffers, gradients and optimizer states: what exists before an iteration starts."""
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    tensors |= {id(p.grad): p.grad for m in modules for p in m.parameters() if p.grad is not None}
    tensors |= {id(t): t for o in optimizers for s in o.state.values() for t in s.values() if torch.is_tensor(t)}
    return sum(t.nbytes for t in tensors.values())


def batch(cfg: Any, args: argparse.Namespace, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random latents of a (frames, height, width) video and random text embeddings, `args.batch` of each."""
    latent = LatentCodec().latent_shape(frames, args.height, args.width)
    arch = planning.wan_architecture(cfg.model)
    text = torch.randn(args.batch, int(cfg.model.text_encoder.max_length), arch["text_dim"], device=device)
    return torch.randn(args.batch, *latent, device=device), text


def autocast(device: torch.device) -> Any:
    """bf16 autocast on a GPU (Lightning's bf16-mixed); float32 on CPU, where bf16 is slow (and at --smoke widths
    the discriminator's bf16 Conv3d/GroupNorm gradients overflowed)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bench_adapt_head(cfg: Any, args: argparse.Namespace, device: torch.device,
                     estimate: Callable[[str], dict[str, float]]) -> list[dict[str, Any]]:
    """Stage 1: one TM-MF step (forward, zero_grad, backward, AdamW) of the TMD student, as Lightning orders it."""
    student = TMDTransformer.from_teacher(build_teacher(cfg, device), head_blocks=int(cfg.tmd.H))
    checkpointed(student, enabled=args.checkpointing)
    text_len, text_dim = int(cfg.model.text_encoder.max_length), planning.wan_architecture(cfg.model)["text_dim"]
    stage = AdaptHeadStage(student, LatentCodec(), RandomText(text_len, text_dim), partial(torch.optim.AdamW, lr=3e-5),
                           M=int(cfg.tmd.M), N=int(cfg.tmd.N)).to(device).train()
    stage.log = stage.log_dict = lambda *a, **k: None
    optimizer = stage.configure_optimizers()["optimizer"]
    x, text = batch(cfg, args, args.frames, device)

    def step() -> None:  # autocast around the training step only, as Lightning's bf16-mixed plugin
        with autocast(device):
            loss = stage.training_step({"latents": x, "text": text}, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, peak = measure(step, device, args.warmup, args.repeats, lambda: state_bytes([stage], [optimizer]))
    return [dict(benchmark="Stage 1 adapt_head", setting=f"TM-MF step, M{cfg.tmd.M} N{cfg.tmd.N}", seconds=seconds,
                 peak=peak, plan=estimate("adapt_head")["step"])]


def distill_stage(kind: str, cfg: Any, args: argparse.Namespace, device: torch.device) -> tuple[Any, list]:
    """A Stage-2 stage (TMD or DMD2-v) around random 1.3B-shaped networks on `device`, the teacher in bf16 on GPU."""
    teacher = build_teacher(cfg, device)
    student = TMDTransformer.from_teacher(teacher, head_blocks=int(cfg.tmd.H)) if kind == "TMD" \
        else copy.deepcopy(teacher)
    text_len, text_dim = int(cfg.model.text_encoder.max_length), planning.wan_architecture(cfg.model)["text_dim"]
    disc = partial(Discriminator, feature_blocks=tuple(cfg.model.disc_blocks),
                   hidden_dim=int(cfg.discriminator_hidden_dim))
    common = dict(codec=LatentCodec(), text_encoder=RandomText(text_len, text_dim),
                  optimizer=partial(torch.optim.AdamW, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01),
                  discriminator=disc, M=int(cfg.tmd.M))
    stage = TMDDistillStage(student, teacher, N=int(cfg.tmd.N), **common) if kind == "TMD" \
        else DMD2Stage(student, teacher, **common)
    stage.to(device)
    if device.type == "cuda":  # what the stage's `setup` does in training: the frozen teacher in bf16
        stage.teacher.to(getattr(torch, stage.hparams.teacher_dtype))
    checkpointed(stage.student, stage.fake_score, stage.teacher, enabled=args.checkpointing)
    optimizers = stage.configure_optimizers()
    return outside_trainer(stage, optimizers), optimizers


def bench_distill(kind: str, cfg: Any, args: argparse.Namespace, device: torch.device,
                  estimate: Callable[[str], dict[str, float]]) -> list[dict[str, Any]]:
    """Stage 2: a student iteration and a critic iteration, and their TTUR mean (one student per four critics)."""
    stage, opts = distill_stage(kind, cfg, args, device)
    x, text = batch(cfg, args, args.frames, device)
    neg = stage.negative_embedding(x.shape[0])
    runs = {"student": lambda: stage.student_iteration(x, text, neg, opts[0]),
            "critic": lambda: stage.critic_iteration(x, text, opts[1], opts[2])}
    planned = estimate("distill" if kind == "TMD" else "distill_dmd2")
    rows = []
    for phase, fn in runs.items():
        def autocast_fn(fn: Callable = fn) -> None:
            with autocast(device):
                fn()

        seconds, peak = measure(autocast_fn, device, args.warmup, args.repeats, lambda: state_bytes([stage], opts))
        rows.append(dict(benchmark=f"Stage 2 {kind}", setting=f"{phase} iteration", seconds=seconds, peak=peak,
                         plan=planned[phase]))
    every = int(stage.hparams.student_every)
    mean = (rows[0]["seconds"] + (every - 1) * rows[1]["seconds"]) / every
    rows.append(dict(benchmark=f"Stage 2 {kind}", setting=f"mean over a TTUR cycle (1 student : {every - 1} critic)",
                     seconds=mean, peak=max(r["peak"] for r in rows), plan=max(planned.values())))
    return rows


def bench_sampling(cfg: Any, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Seconds per video of the teacher (Euler, `--teacher-steps` x CFG 5) and of the TMD sampler (M, N)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = build_teacher(cfg, device).to(dtype).eval()
    student = TMDTransformer.from_teacher(teacher, head_blocks=int(cfg.tmd.H)).to(dtype).eval()
    noise, text = batch(cfg, args, args.sample_frames, device)
    noise, text = noise[:1], text[:1]
    neg = torch.randn_like(text)
    L, H = teacher.config.num_layers, int(cfg.tmd.H)

    def velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return teacher(x.to(dtype), timestep=t * 1000.0, encoder_hidden_states=c.to(dtype), return_dict=False)[0]

    def sample(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device):
                fn()
        return run

    samplers = [(f"teacher Euler {args.teacher_steps} x CFG 5", effective_nfe(args.teacher_steps, cfg=True),
                 sample(lambda: teacher_sample(cfg_velocity(velocity, text, neg, 5.0), noise, args.teacher_steps)))]
    for M, N in [(int(cfg.tmd.M), int(cfg.tmd.N)), (1, int(cfg.tmd.N))]:
        samplers.append((f"TMD M={M} N={N}", effective_nfe(M, N, H, L),
                         sample(lambda M=M, N=N: tmd_sample(student, noise.to(dtype), text.to(dtype), M, N))))
    for _ in range(args.warmup):  # kernels and autotuning, once for all samplers (the teacher's run is long)
        samplers[-1][2]()
    rows = []
    for name, nfe, fn in samplers:
        seconds, peak = measure(fn, device, 0, 1, lambda: state_bytes([teacher, student], []))
        rows.append(dict(benchmark="sampling, per video", setting=f"{name}, NFE {nfe:.2f}", seconds=seconds,
                         peak=peak, plan=None))
    for row in rows[1:]:
        row["setting"] += f", {rows[0]['seconds'] / row['seconds']:.1f}x faster than the teacher"
    return rows


def table(rows: list[dict[str, Any]], unit: str = "GiB") -> str:
    """The Markdown table; memory in GiB (MiB for the tiny --smoke sizes)."""
    scale = planning.GIB if unit == "GiB" else 2**20
    lines = [f"| benchmark | setting | seconds | peak {unit} | plan {unit} |", "|---|---|---:|---:|---:|"]
    for r in rows:
        estimate = "" if r["plan"] is None else f"{r['plan'] / scale:.2f}"
        lines.append(f"| {r['benchmark']} | {r['setting']} | {r['seconds']:.3f} | {r['peak'] / scale:.2f} | "
                     f"{estimate} |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def header(args: argparse.Namespace, device: torch.device, cfg: Any) -> list[str]:
    """The lines above the table: date, device, network shape, precision, video sizes and repeats."""
    name = device_name(device)
    arch = planning.wan_architecture(cfg.model)
    train = LatentCodec().latent_shape(args.frames, args.height, args.width)
    sample = LatentCodec().latent_shape(args.sample_frames, args.height, args.width)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    return [f"- date: {date}; device: {name}; torch {torch.__version__}",
            f"- {args.model}{' (--smoke: tiny widths)' if args.smoke else ''}: L = {arch['num_layers']}, "
            f"D = {arch['num_attention_heads'] * arch['attention_head_dim']}, H = {cfg.tmd.H}; random weights; "
            + ("bf16 autocast, float32 trainable weights, bf16 teacher and samplers" if device.type == "cuda"
               else "float32 throughout (CPU)"),
            f"- training: {args.frames} x {args.height} x {args.width} video -> latents {tuple(train)}, batch "
            f"{args.batch}, activation checkpointing {'on' if args.checkpointing else 'off'}; mean of {args.repeats} "
            f"after {args.warmup} warm-up",
            f"- sampling: {args.sample_frames} x {args.height} x {args.width} -> latents {tuple(sample)}, one video"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --smoke shrinks the video and the repeats as well as the widths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wan2.1_t2v_1.3b", help="configs/model/<name>.yaml with `architecture`")
    parser.add_argument("--frames", type=int, default=21, help="training video frames (4k + 1)")
    parser.add_argument("--sample-frames", type=int, default=81, help="sampling video frames (4k + 1)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--batch", type=int, default=1, help="videos per training iteration")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized widths and video (CI), any device")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", type=Path, default=None, help="append the table (with device and date) here")
    args = parser.parse_args(argv)
    if args.smoke:  # one thread: tiny ops gain nothing from more, and CI machines are shared
        args.frames, args.sample_frames, args.height, args.width = 5, 5, 32, 32
        args.teacher_steps, args.repeats = min(args.teacher_steps, 4), 1
        torch.set_num_threads(1)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs every benchmark, prints the table, appends it to `--output`; returns the rows (for the tests)."""
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.smoke:
        print("no GPU: running at real scale on a CPU would take hours; use --smoke for the CPU-sized run")
    torch.manual_seed(0)
    cfg = plan_config(args, device)
    estimate = planner(cfg, args.checkpointing)
    rows = bench_adapt_head(cfg, args, device, estimate)
    empty(device)
    for kind in ("TMD", "DMD2-v"):
        rows += bench_distill(kind, cfg, args, device, estimate)
        empty(device)
    rows += bench_sampling(cfg, args, device)
    text = "\n".join(header(args, device, cfg)) + "\n\n" + table(rows, "MiB" if args.smoke else "GiB")
    print(text)
    if args.output is not None:
        with open(args.output, "a") as fh:
            command = " ".join(argv if argv is not None else sys.argv[1:])
            fh.write(f"\n## {datetime.date.today().isoformat()}, {device_name(device)}\n\n"
                     f"`python benchmarks/scale.py {command}`\n\n{text}\n")
        print(f"\nappended to {args.output}")
    assert all(math.isfinite(r["seconds"]) and math.isfinite(r["peak"]) for r in rows)
    return rows


def empty(device: torch.device) -> None:
    """Frees what the previous benchmark left on the GPU."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""LoRA-mode benchmark (docs/method.md §9): Stage-2 speed and memory, full copies vs LoRA adapters.

    python benchmarks/lora.py            # a few minutes on 2 CPU cores
    python benchmarks/lora.py --quick    # smoke run

Two tables. (1) The toy (TMD student from the shipped toy teacher, batch 16, as `benchmarks/distill.py`): seconds
per student and per critic iteration (medians, the modes interleaved), and the bytes the stage holds (distinct
parameter/buffer storages of student, teacher, fake score, discriminator), its trainable parameters and their
gradient + AdamW state after the timed iterations, for: full copies; the fake score as a LoRA adapter on the teacher;
and the student as LoRA too. (2) The same memory accounting for Wan2.1 1.3B and 14B, counted on the meta device
(no weights are allocated): teacher bf16, trainable weights float32 with float32 gradients and AdamW's two float32
states (16 bytes per trainable parameter), a LoRA student's frozen base float32 (4 bytes); activations and the
discriminator are not counted. (3) Speed at Wan 1.3B width on a 2-block slice: what a LoRA fake score costs per
call where the adapter is small against the weights (at toy width 128 a rank-64 adapter is as big as the weights).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from foundation import toy_batch, toy_codec  # noqa: E402

from tmd_lightning.models import (  # noqa: E402
    TOY_MODEL_DIR,
    Discriminator,
    TextEncoder,
    TMDTransformer,
    build_student,
    load_transformer,
)
from tmd_lightning.models.lora import FAKE_SCORE, AdapterView, LoraSettings, add_lora  # noqa: E402
from tmd_lightning.stages import TMDDistillStage  # noqa: E402

NETWORKS = ("student", "teacher", "fake_score", "discriminator")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]  # configs/stage/distill.yaml
MODES = {"full copies": None,
         "LoRA fake score": {"fake_score": True},
         "LoRA fake score + student": {"fake_score": True, "student": True}}
WAN = {  # diffusers' transformer/config.json of Wan2.1-T2V-1.3B and -14B
    "Wan2.1 1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "Wan2.1 14B": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}


def build(text_encoder: TextEncoder, lora: dict[str, Any] | None) -> tuple[TMDDistillStage, list]:
    """The toy TMD stage of `benchmarks/distill.py` (H = 1 of L = 6, N = 2, heads at blocks 3-5), in a LoRA mode."""
    teacher = load_transformer(pretrained=TOY_MODEL_DIR)
    student = build_student(teacher=str(TOY_MODEL_DIR), head_blocks=1)
    stage = TMDDistillStage(student, teacher, toy_codec(), text_encoder,
                            partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01),
                            partial(Discriminator, feature_blocks=(3, 4, 5), hidden_dim=64), N=2, lora=lora)
    opts = stage.configure_optimizers()
    stage.optimizers = lambda: opts  # outside a Trainer, as benchmarks/distill.py
    stage.log = stage.log_dict = lambda *a, **k: None
    stage.manual_backward = lambda tensor, *a, **k: tensor.backward(*a, **k)
    return stage.train(), opts


def held_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers (shared weights counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(storages.values())


def training_state_bytes(optimizers: list[torch.optim.Optimizer]) -> tuple[int, int, int]:
    """(trainable parameters, their gradient bytes, optimizer-state bytes) over the stage's optimizers."""
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    grads = sum(p.numel() * p.element_size() for p in params)  # a full-size gradient per trainable tensor
    state = sum(v.numel() * v.element_size() for opt in optimizers for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return sum(p.numel() for p in params), grads, state


def time_rounds(stages: dict[str, tuple], batch: dict, warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of a student and a critic iteration per mode, the modes interleaved round by round so that
    a busy machine slows them alike (the stages' own iteration methods, as `benchmarks/distill.py` times them)."""
    runs = {}
    for mode, (stage, opts) in stages.items():
        x, text = stage.encode_batch(batch)
        neg = stage.negative_embedding(x.shape[0])
        runs[mode] = {"student": partial(stage.student_iteration, x, text, neg, opts[0]),
                      "critic": partial(stage.critic_iteration, x, text, opts[1], opts[2])}
    seconds: dict[str, dict[str, list[float]]] = {m: {"student": [], "critic": []} for m in runs}
    for i in range(warmup + rounds):
        for mode, phases in runs.items():
            for phase, fn in phases.items():
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    seconds[mode][phase].append(time.perf_counter() - start)
    return {m: {ph: statistics.median(v) for ph, v in phases.items()} for m, phases in seconds.items()}


def toy_rows(batch_size: int, warmup: int, rounds: int, rank: int) -> list[dict[str, Any]]:
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    stages = {}
    for mode, lora in MODES.items():
        torch.manual_seed(0)
        stages[mode] = build(text_encoder, None if lora is None else lora | {"rank": rank, "alpha": rank})
    timing = time_rounds(stages, toy_batch(batch_size), warmup, rounds)
    rows = []
    for mode, (stage, opts) in stages.items():
        trainable, grads, state = training_state_bytes(opts)
        rows.append({"mode": mode, "student_s": timing[mode]["student"], "critic_s": timing[mode]["critic"],
                     "held": held_bytes([getattr(stage, n) for n in NETWORKS]), "trainable": trainable,
                     "grads": grads, "state": state})
    return rows


def scale_rows(name: str, config: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    """Memory of the TMD Stage-2 networks at real scale, counted on the meta device (H = 5 flow-head blocks)."""
    with torch.device("meta"):
        wan = load_transformer(config=dict(config))
        settings = LoraSettings(rank=rank, alpha=rank, target_modules=tuple(TARGETS))
        wan_numel = sum(p.numel() for p in wan.parameters())
        adapter_numel = sum(p.numel() for p in add_lora(wan, settings, FAKE_SCORE).values())
        student = TMDTransformer(wan_config=dict(config), head_blocks=5)
        extra_numel = sum(p.numel() for n, p in student.named_parameters() if not n.startswith("wan."))
    teacher = 2 * wan_numel  # bf16, frozen
    trained = 16  # float32 weight + gradient + AdamW exp_avg, exp_avg_sq
    full_student, full_fake = trained * (wan_numel + extra_numel), trained * wan_numel
    lora_student = 4 * wan_numel + trained * (adapter_numel + extra_numel)
    lora_fake = trained * adapter_numel
    return [{"model": name, "mode": "full copies", "total": teacher + full_student + full_fake,
             "trainable": 2 * wan_numel + extra_numel},
            {"model": name, "mode": "LoRA fake score", "total": teacher + full_student + lora_fake,
             "trainable": wan_numel + extra_numel + adapter_numel},
            {"model": name, "mode": "LoRA fake score + student", "total": teacher + lora_student + lora_fake,
             "trainable": 2 * adapter_numel + extra_numel}]


def scale_speed(config: dict[str, Any], rank: int, warmup: int, rounds: int) -> dict[str, float]:
    """Median seconds of fake-score and teacher calls at Wan 1.3B width (2 of its 30 blocks, one 1x32x32 latent:
    256 tokens; random weights), the variants interleaved: a full trainable copy vs the LoRA view, forward only and
    forward + backward + AdamW step (the critic's work), and the teacher with the adapter disabled vs a plain one."""
    torch.manual_seed(0)
    plain = load_transformer(config=dict(config, num_layers=2)).eval()
    full = copy.deepcopy(plain).requires_grad_(True)
    host = copy.deepcopy(plain)
    add_lora(host, LoraSettings(rank=rank, alpha=rank, target_modules=tuple(TARGETS)), FAKE_SCORE)
    view = AdapterView(host, FAKE_SCORE)
    x, t, text = torch.randn(1, 16, 1, 32, 32), torch.tensor([500.0]), torch.randn(1, 16, config["text_dim"])
    opts = {"full": torch.optim.AdamW(full.parameters()), "lora": torch.optim.AdamW(view.parameters())}

    def forward(net: nn.Module) -> torch.Tensor:
        return net(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def train_step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        forward(net).float().pow(2).mean().backward()
        opt.step()

    calls = {"teacher forward, plain": lambda: forward(plain).detach(),
             "teacher forward, adapter disabled": lambda: forward(host).detach(),
             "fake-score forward, full copy": lambda: forward(full).detach(),
             "fake-score forward, LoRA": lambda: forward(view).detach(),
             "fake-score fwd + bwd + AdamW, full copy": lambda: train_step(full, opts["full"]),
             "fake-score fwd + bwd + AdamW, LoRA": lambda: train_step(view, opts["lora"])}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in seconds.items()}


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (= alpha), the stage config's default 64")
    args = parser.parse_args(argv)
    warmup, repeats = (1, 1) if args.quick else (2, 8)
    print(f"# tmd_lightning LoRA-mode benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}, {platform.machine()}")
    print(f"- toy TMD (M2 N2 H1 of L6), batch {args.batch_size}, median of {repeats} iterations per phase after "
          f"{warmup} warm-up, modes interleaved; LoRA rank = alpha = {args.rank} on {', '.join(TARGETS)}\n")
    rows = toy_rows(args.batch_size, warmup, repeats, args.rank)
    print("| mode | student s/it | critic s/it | TTUR-cycle s/it | weights held MB | trainable params | "
          "grads MB | AdamW state MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cycle = (r["student_s"] + 4 * r["critic_s"]) / 5
        print(f"| {r['mode']} | {r['student_s']:.3f} | {r['critic_s']:.3f} | {cycle:.3f} | {_mb(r['held'])} | "
              f"{r['trainable']:,} | {_mb(r['grads'])} | {_mb(r['state'])} |")
    print(f"\nAt scale (TMD H = 5; teacher bf16; trained weights 16 B/param; LoRA rank {args.rank}; no activations):\n")
    print("| model | mode | trainable params | weights + grads + AdamW GB |")
    print("|---|---|---:|---:|")
    for name, config in WAN.items():
        for r in scale_rows(name, config, args.rank):
            print(f"| {r['model']} | {r['mode']} | {r['trainable'] / 1e6:,.1f} M | {r['total'] / 2**30:.1f} |")
    print(f"\nSpeed at Wan2.1 1.3B width (2 of 30 blocks, 256 tokens, batch 1, float32, LoRA rank {args.rank}; "
          "median of interleaved calls):\n")
    print("| call | seconds |")
    print("|---|---:|")
    for name, sec in scale_speed(WAN["Wan2.1 1.3B"], args.rank, 1, 2 if args.quick else 6).items():
        print(f"| {name} | {sec:.3f} |")


if __name__ == "__main__":
    main()

"""Foundation benchmark: teacher training speed, video decoding speed, teacher sampling cost (toy world, CPU).

    python benchmarks/foundation.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/foundation.py --quick    # smoke run, < 60 s

Prints a Markdown table. The toy teacher's transformer is built from `configs/model/toy.yaml` (random weights: the
speed does not depend on them); the text encoder is the shipped toy T5; the codec and the guidance scale are
the config's (`toy_codec`, `toy_guidance`, shared with the other toy benchmarks so they follow the config).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tmd_lightning.data.backends import get_backend  # noqa: E402
from tmd_lightning.data.toy_world import all_captions, generate_toy_dataset, parse_caption, random_spec, render  # noqa: E402
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder, load_transformer  # noqa: E402
from tmd_lightning.sampling import effective_nfe, teacher_sample  # noqa: E402
from tmd_lightning.stages import TeacherStage  # noqa: E402


def toy_model_cfg() -> DictConfig:
    """configs/model/toy.yaml, the toy's networks as `fit` builds them."""
    return OmegaConf.load(ROOT / "configs" / "model" / "toy.yaml")


def toy_codec() -> PixelCodec:
    """The toy codec as the config builds it (patch and frames per latent frame), so a benchmark's latents have the
    channels and frames the transformer expects."""
    return instantiate(toy_model_cfg().codec)


def toy_guidance() -> float:
    """The toy's classifier-free guidance scale (`model.guidance_scale`)."""
    return float(toy_model_cfg().guidance_scale)


def toy_stage(seed: int = 0) -> TeacherStage:
    model_cfg = toy_model_cfg()
    stage_cfg = OmegaConf.load(ROOT / "configs" / "stage" / "teacher.yaml")
    torch.manual_seed(seed)
    transformer = load_transformer(config=model_cfg.transformer_config)
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=int(model_cfg.text_encoder.max_length),
                                               model_class=model_cfg.text_encoder.model_class)
    opt = stage_cfg.optimizer
    optimizer = partial(torch.optim.AdamW, lr=float(opt.lr), betas=tuple(opt.betas),
                        weight_decay=float(opt.weight_decay))
    return TeacherStage(transformer, toy_codec(), text_encoder, optimizer,
                        cond_dropout=float(stage_cfg.cond_dropout), t_shift=float(stage_cfg.t_shift))


def toy_batch(batch_size: int, num_frames: int = 9, size: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    caps = [all_captions()[i % 48] for i in range(batch_size)]
    videos = np.stack([render(random_spec(rng, **parse_caption(c)), num_frames, size) for c in caps])
    return {"video": torch.from_numpy(videos), "caption": caps}


def seconds_per_step(stage, batch: dict, warmup: int, steps: int) -> float:
    """Mean wall-clock seconds of a full optimisation step (forward, backward, optimizer) of `stage`."""
    stage.train()
    opt = stage.configure_optimizers()["optimizer"]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        stage.training_step(batch, 0).backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def bench_training(batch_size: int, warmup: int, steps: int) -> dict:
    stage = toy_stage()
    sec = seconds_per_step(stage, toy_batch(batch_size), warmup, steps)
    params = sum(p.numel() for p in stage.transformer.parameters())
    return {"sec_per_step": sec, "samples_per_sec": batch_size / sec, "params": params}


def bench_decoding(videos_per_caption: int, size: int, backend: str, root: Path) -> dict:
    manifest = generate_toy_dataset(root / f"toy{size}", videos_per_caption=videos_per_caption, size=size,
                                    split="bench")
    with open(manifest) as fh:
        paths = [manifest.parent / row["path"] for row in csv.DictReader(fh)]
    reader = get_backend(backend)
    reader.read(paths[0], 9)  # warm-up (imports, codec init)
    t0 = time.perf_counter()
    for p in paths:
        clip = reader.read(p, 9)
        assert clip.shape == (9, size, size, 3), clip.shape
    sec = time.perf_counter() - t0
    return {"videos": len(paths), "videos_per_sec": len(paths) / sec}


def bench_sampling(batch_size: int, steps: int, cfg: float) -> dict:
    stage = toy_stage().eval()
    caps = all_captions()[:batch_size]
    stage.generate(caps[:1], [0], 9, 16, 16, steps=1, cfg=cfg)  # warm-up
    t0 = time.perf_counter()
    videos = stage.generate(caps, list(range(batch_size)), 9, 16, 16, steps=steps, cfg=cfg)
    sec = time.perf_counter() - t0
    assert videos.shape == (batch_size, 9, 16, 16, 3)
    return {"sec_per_video": sec / batch_size, "nfe": stage.sampler_nfe(steps=steps, cfg=cfg)}


def bench_sampling_glue(batch_size: int = 8, few: int = 20, many: int = 220, repeats: int = 5) -> dict:
    """The sampling loop's own cost per step (time grid, per-step time tensor, Euler update), with a zero-cost
    velocity on toy latents (the config's codec, 9 x 16 x 16 frames): the slope of the best-of-`repeats` time from
    `few` to `many` steps."""
    noise = torch.randn(batch_size, *toy_codec().latent_shape(9, 16, 16))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x  # no network: what remains is the loop's glue

    def best(steps: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                teacher_sample(velocity, noise, steps, 3.0)
            times.append(time.perf_counter() - t0)
        return min(times)

    best(few)  # warm-up
    return {"us_per_step": (best(many) - best(few)) / (many - few) * 1e6, "batch_size": batch_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and videos (smoke test, < 60 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        train = dict(batch_size=32, warmup=1, steps=2)
        vpc, sample = 1, dict(batch_size=2, steps=5, cfg=toy_guidance())
    else:
        train = dict(batch_size=32, warmup=3, steps=10)
        vpc, sample = 4, dict(batch_size=8, steps=50, cfg=toy_guidance())

    print(f"# tmd_lightning foundation benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}, "
          f"{platform.machine()}, device cpu\n")

    rows = []
    r = bench_training(**train)
    setting = f"toy config ({r['params'] / 1e6:.2f} M params), batch {train['batch_size']}, 9x16x16, " \
              f"mean of {train['steps']} steps after {train['warmup']} warm-up"
    rows.append(("teacher training", setting, f"{r['sec_per_step']:.3f}", "s / step"))
    rows.append(("teacher training", setting, f"{r['samples_per_sec']:.1f}", "samples / s"))

    with tempfile.TemporaryDirectory() as tmp:
        for backend, size in [("decord", 32), ("pyav", 16), ("pyav", 32)]:
            r = bench_decoding(vpc, size, backend, Path(tmp))
            rows.append(("data loading", f"{backend}, {r['videos']} toy MP4s, 9x{size}x{size}",
                         f"{r['videos_per_sec']:.1f}", "videos / s"))

    r = bench_sampling(**sample)
    nfe = effective_nfe(sample["steps"], cfg=sample["cfg"] != 1.0)
    assert r["nfe"] == nfe
    rows.append(("teacher sampling", f"Euler {sample['steps']} steps x 2 (CFG {sample['cfg']}), NFE {nfe:g}, "
                 f"batch {sample['batch_size']}, 9x16x16", f"{r['sec_per_video']:.3f}", "s / video"))
    glue = bench_sampling_glue()
    rows.append(("sampling loop glue", f"Euler, zero-cost velocity, batch {glue['batch_size']} toy latents "
                 "(no host-device sync per step)", f"{glue['us_per_step']:.1f}", "µs / step"))

    print("| benchmark | setting | value | unit |")
    print("|---|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

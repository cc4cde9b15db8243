"""What the toy classifier's shape errors are made of: the students' background speckle against their shapes.

    python benchmarks/toy_speckle_probe.py --model logs/distill/latest/export/student            # the export (EMA)
    python benchmarks/toy_speckle_probe.py --model logs/distill/latest/checkpoints/last.ckpt     # raw weights
    python benchmarks/toy_speckle_probe.py --model tmd_lightning/assets/toy_wan --steps 50       # the teacher

Each model samples every caption with `--seeds` sampling seeds (its own sampler; `--M`, `--N`, `--steps` override it)
and gets one table row per variant of its videos:

- `as sampled`: shape accuracy per prompted shape, their mean (joint accuracy when colour and direction are right,
  as they are for every student so far), and the median fill ratio per shape, the statistic the classifier
  thresholds (square >= 0.91 > circle >= 0.778 > triangle; the data: squares 0.99-1.00, circles 0.79-0.83,
  triangles 0.60-0.77);
- `far background cleaned`: the same after every pixel more than 2 px from the shape (pixels at least 0.5 of the
  palette contrast) is set to the background colour: what the shapes alone would score.

The `speckle` columns are the far background's mean foreground weight (the classifier's soft weight, relative to
the palette contrast) and the share of its pixels at or above the classifier's 0.1 floor, where speckle starts to
count in the fill ratio: it widens the rows and columns a triangle spans and reads it as a circle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tmd_lightning.data.toy_world import BACKGROUND, COLOURS, SHAPES, all_captions, parse_caption  # noqa: E402
from tmd_lightning.evaluation.generate import generate_videos, load_model  # noqa: E402
from tmd_lightning.metrics.toy import _shape_fill, classify, foreground_weights  # noqa: E402
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder  # noqa: E402

NEAR_PX = 2  # pixels around the shape that count as "near" (its anti-aliased edge and a margin)


def far_background(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W) bool: pixels more than NEAR_PX from any pixel at >= 0.5 of the palette contrast."""
    core = (foreground_weights(videos) > 0).float()
    near = F.max_pool2d(core.flatten(0, 1)[:, None], 2 * NEAR_PX + 1, 1, NEAR_PX)[:, 0].view_as(core)
    return near == 0


def shape_row(videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Shape accuracy and median fill per prompted shape (NaN for a shape no caption names), and the mean accuracy
    over the shapes present."""
    preds = classify(videos)
    colour = torch.tensor([list(COLOURS).index(parse_caption(c)["colour"]) for c in captions])
    fill = _shape_fill(videos, colour).median(dim=1).values
    row, present = {}, []
    for shape in SHAPES:
        idx = [i for i, c in enumerate(captions) if parse_caption(c)["shape"] == shape]
        row[f"acc_{shape}"] = sum(preds[i]["shape"] == shape for i in idx) / len(idx) if idx else float("nan")
        row[f"fill_{shape}"] = float(fill[idx].median()) if idx else float("nan")
        present += [row[f"acc_{shape}"]] if idx else []
    row["acc_shape"] = sum(present) / len(present)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a diffusers folder or a stage .ckpt")
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds per caption")
    parser.add_argument("--M", type=int, default=None)
    parser.add_argument("--N", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="teacher: Euler steps")
    args = parser.parse_args()
    model_cfg = OmegaConf.load(ROOT / "configs" / "model" / "toy.yaml")
    codec = instantiate(model_cfg.codec)
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    options = {k: v for k, v in (("M", args.M), ("N", args.N), ("steps", args.steps)) if v is not None}
    pairs = [(c, s) for c in all_captions() for s in range(args.seeds)]
    captions = [c for c, _ in pairs]
    background = torch.tensor(BACKGROUND, dtype=torch.uint8)
    print(f"{len(pairs)} videos per model ({len(all_captions())} captions x {args.seeds} seeds)\n")
    print("| model | sampler | variant | shape acc | square | circle | triangle | fill square / circle / triangle "
          "| speckle: mean weight | speckle: share >= 0.1 |\n|---|---|---|---:|---:|---:|---:|---|---:|---:|")
    for path in args.model:
        stage = load_model(path, codec, text_encoder, model_cfg.negative_prompt).eval()
        kwargs = {k: v for k, v in options.items() if k in stage.sampler.options()}
        label = stage.sampler.with_options(**kwargs).label()
        videos, _ = generate_videos(stage, pairs, (9, 16, 16), 64, **kwargs)
        far = far_background(videos)
        weight = foreground_weights(videos, threshold=0.0)[far]
        cleaned = torch.where(far[..., None], background.expand_as(videos), videos)
        speckle = f"{float(weight.mean()):.3f} | {float((weight >= 0.1).float().mean()):.3f}"
        for name, vids in (("as sampled", videos), ("far background cleaned", cleaned)):
            r = shape_row(vids, captions)
            print(f"| {path} | {label} | {name} | {r['acc_shape']:.3f} | {r['acc_square']:.2f} | "
                  f"{r['acc_circle']:.2f} | {r['acc_triangle']:.2f} | {r['fill_square']:.3f} / "
                  f"{r['fill_circle']:.3f} / {r['fill_triangle']:.3f} | "
                  f"{speckle if name == 'as sampled' else '- | -'} |", flush=True)


if __name__ == "__main__":
    main()

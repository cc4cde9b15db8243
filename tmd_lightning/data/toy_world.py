"""The procedural toy text-to-video world (docs/method.md §6).

One coloured shape moves at constant speed over a dark background; the caption names its colour, shape and
direction. Videos are rendered with anti-aliasing (supersampled, then area-averaged) and written as H.264 MP4
files plus a CSV manifest, so the toy data flows through exactly the same decode path as real data.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmd_lightning.progress import progress

BACKGROUND = (16, 16, 16)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CAPTION_TEMPLATE = "a {colour} {shape} moving {direction}"
FPS = 8
SUPERSAMPLE = 8


@dataclass(frozen=True)
class ToyVideoSpec:
    """Everything that determines one toy video; sizes and positions are fractions of the canvas."""

    colour: str
    shape: str
    direction: str
    size: float  # shape width / canvas width
    travel: float  # distance covered over the clip / canvas width
    start_x: float  # centre at frame 0
    start_y: float

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(colour=self.colour, shape=self.shape, direction=self.direction)


def all_captions() -> list[str]:
    """The 48 captions of the grammar, in a fixed order."""
    return [
        CAPTION_TEMPLATE.format(colour=c, shape=s, direction=d)
        for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)
    ]


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of the caption grammar; raises ValueError on anything else."""
    words = caption.strip().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"not a toy caption: {caption!r}")
    colour, shape, direction = words[1], words[2], words[4]
    if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"not a toy caption: {caption!r}")
    return {"colour": colour, "shape": shape, "direction": direction}


def random_spec(rng: np.random.Generator, colour: str, shape: str, direction: str) -> ToyVideoSpec:
    """Draws size, travel and a start that keeps the shape on the canvas for the whole clip."""
    size = float(rng.uniform(0.3, 0.4))
    travel = float(rng.uniform(0.3, 0.45))
    dx, dy = DIRECTIONS[direction]
    half = size / 2
    lo_x, hi_x = half - min(dx, 0) * travel, 1 - half - max(dx, 0) * travel
    lo_y, hi_y = half - min(dy, 0) * travel, 1 - half - max(dy, 0) * travel
    return ToyVideoSpec(
        colour, shape, direction, size, travel, float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
    )


def _coverage(shape: str, cx: float, cy: float, size: float, res: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a res x res canvas."""
    n = res * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(coords, coords)
    half = size / 2
    u, v = (xx - cx) / half, (yy - cy) / half  # in [-1, 1] inside the bounding box
    if shape == "square":
        mask = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == "circle":
        mask = u**2 + v**2 <= 1
    elif shape == "triangle":  # apex up, base down: half of its bounding box
        mask = (v <= 1) & (v >= -1) & (np.abs(u) <= (v + 1) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ToyVideoSpec, num_frames: int = 9, size: int = 16) -> np.ndarray:
    """Renders a (F, H, W, 3) uint8 video of one spec."""
    dx, dy = DIRECTIONS[spec.direction]
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    frames = []
    for f in range(num_frames):
        p = f / max(num_frames - 1, 1)
        cov = _coverage(spec.shape, spec.start_x + dx * spec.travel * p, spec.start_y + dy * spec.travel * p,
                        spec.size, size)[..., None]
        frames.append(bg * (1 - cov) + fg * cov)
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = FPS, crf: int = 10) -> None:
    """Writes (F, H, W, 3) uint8 frames as H.264 (yuv444p keeps the toy's small colour blobs intact)."""
    from tmd_lightning.media import write_h264

    write_h264(path, frames, fps, crf, pix_fmt="yuv444p")


def generate_toy_dataset(
    root: str | Path,
    videos_per_caption: int = 96,
    num_frames: int = 9,
    size: int = 16,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Writes `videos_per_caption` MP4s for each of the 48 captions and returns the manifest path.

    Reuses an existing dataset when its recorded parameters match, so this is cheap to call on every run.
    """
    root = Path(root) / split
    manifest = root / "manifest.csv"
    params = {"videos_per_caption": videos_per_caption, "num_frames": num_frames, "size": size, "seed": seed,
              "version": 1}
    stamp = root / "toy_world.json"
    if manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return manifest
    rng = np.random.default_rng(seed)
    rows = []
    captions = all_captions()
    for i, caption in progress(enumerate(captions), f"writing the toy world ({split})", total=len(captions)):
        attrs = parse_caption(caption)
        for k in range(videos_per_caption):
            spec = random_spec(rng, **attrs)
            rel = f"videos/{i:02d}_{k:04d}.mp4"
            write_mp4(root / rel, render(spec, num_frames, size))
            rows.append({"path": rel, "caption": caption, "num_frames": num_frames, "height": size,
                         "width": size, "fps": FPS})
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stamp.write_text(json.dumps(params))
    return manifest

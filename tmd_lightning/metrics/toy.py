"""Analytic toy-world metrics (docs/method.md §6): attribute classifiers, per-attribute/joint accuracy, toy-FD
features.

No network is involved, so what they report about generated videos is about the generator. A test checks that
they score real toy videos at >= 0.98 per attribute.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from tmd_lightning.data.toy_world import BACKGROUND, COLOURS, SHAPES, parse_caption

ATTRIBUTES = ("colour", "shape", "direction")
AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}
# Shape statistic: soft foreground area / (widest row x tallest column), all in sub-pixel (anti-aliased) units:
# square 1, circle pi/4, triangle 1/2 for ideal shapes. Measured on rendered, H.264-coded 16 px toy videos:
# square 0.99-1.00, circle 0.79-0.83, triangle 0.60-0.77; the bounds sit in those gaps.
SHAPE_FILL_BOUNDS = (0.778, 0.91)


def foreground_weights(videos: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, F, H, W) soft foreground weight in [0, 1].

    A pixel's weight is its distance from the background relative to the distance of the nearest palette colour,
    so anti-aliased edges count fractionally; pixels below `threshold` of that contrast count as background.
    """
    x = videos.float()
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device)
    contrast = min(float(torch.dist(torch.tensor(c, dtype=x.dtype), bg.cpu())) for c in COLOURS.values())
    w = ((x - bg).norm(dim=-1) / contrast).clamp(0, 1)
    return torch.where(w >= threshold, w, torch.zeros_like(w))


def _shape_fill(videos: torch.Tensor, colour_idx: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """(B, F) shape statistic: soft area / (widest row x tallest column), weights relative to each video's colour."""
    x = videos.float()
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device)
    palette = torch.tensor(list(COLOURS.values()), dtype=x.dtype, device=x.device)
    contrast = (palette - bg).norm(dim=-1)[colour_idx].view(-1, 1, 1, 1)
    w = ((x - bg).norm(dim=-1) / contrast).clamp(0, 1)
    w = w * (w >= floor)
    area = w.sum(dim=(2, 3))
    widest, tallest = w.sum(dim=3).amax(dim=-1), w.sum(dim=2).amax(dim=-1)
    return area / (widest * tallest).clamp_min(1e-6)


def classify(videos: torch.Tensor) -> list[dict[str, str | None]]:
    """Predicted colour, shape and direction per (B, F, H, W, 3) uint8 video; None where there is no foreground."""
    w = foreground_weights(videos)  # (B, F, H, W)
    b, f, h, wd = w.shape
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=videos.device)
    ys = torch.arange(h, dtype=torch.float32, device=videos.device).view(1, 1, h, 1)
    xs = torch.arange(wd, dtype=torch.float32, device=videos.device).view(1, 1, 1, wd)
    mass = w.sum(dim=(2, 3))  # (B, F)
    cx = (w * xs).sum(dim=(2, 3)) / mass.clamp_min(1e-6)
    cy = (w * ys).sum(dim=(2, 3)) / mass.clamp_min(1e-6)
    mean_rgb = (w.unsqueeze(-1) * videos.float()).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1e-6)[:, None]
    colour_idx = torch.cdist(mean_rgb, palette).argmin(dim=1)
    fill = _shape_fill(videos, colour_idx)
    results = []
    names = list(COLOURS)
    for i in range(b):
        present = mass[i] > 1.0
        if present.sum() < 2:
            results.append({"colour": None, "shape": None, "direction": None})
            continue
        frames = present.nonzero().flatten()
        first, last = int(frames[0]), int(frames[-1])
        dx, dy = float(cx[i, last] - cx[i, first]), float(cy[i, last] - cy[i, first])
        if abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
        r = float(fill[i][present].median())
        shape = SHAPES[2] if r < SHAPE_FILL_BOUNDS[0] else SHAPES[1] if r < SHAPE_FILL_BOUNDS[1] else SHAPES[0]
        results.append({"colour": names[int(colour_idx[i])], "shape": shape, "direction": direction})
    return results


DIRECTIONS = ("left", "right", "up", "down")


def direction_confusion(videos: torch.Tensor, captions: list[str]) -> dict[str, dict[str, int]]:
    """The direction probe: for each direction word in the captions, how many videos move which way ("none": no
    foreground). A model that binds the word shows a diagonal; one that knows only the axis splits each row
    between the two directions of that axis alike (the same split for "left" and "right")."""
    table = {word: dict.fromkeys((*DIRECTIONS, "none"), 0) for word in DIRECTIONS}
    for pred, caption in zip(classify(videos), captions, strict=True):
        table[parse_caption(caption)["direction"]][pred["direction"] or "none"] += 1
    return {word: row for word, row in table.items() if sum(row.values())}


def toy_features(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, D) float64 per-video features for toy-FD.

    Centroid track (x, y per frame, in canvas units), foreground area per frame, mean foreground colour, and
    colour spread; together they see position, motion, size and colour statistics.
    """
    w = foreground_weights(videos)
    b, f, h, wd = w.shape
    ys = torch.linspace(0, 1, h, device=videos.device).view(1, 1, h, 1)
    xs = torch.linspace(0, 1, wd, device=videos.device).view(1, 1, 1, wd)
    mass = w.sum(dim=(2, 3))
    cx = (w * xs).sum(dim=(2, 3)) / mass.clamp_min(1e-6)
    cy = (w * ys).sum(dim=(2, 3)) / mass.clamp_min(1e-6)
    area = mass / (h * wd)
    x = videos.float() / 255.0
    wsum = w.sum(dim=(1, 2, 3)).clamp_min(1e-6)[:, None]
    mean_rgb = (w.unsqueeze(-1) * x).sum(dim=(1, 2, 3)) / wsum
    var_rgb = (w.unsqueeze(-1) * (x - mean_rgb[:, None, None, None]) ** 2).sum(dim=(1, 2, 3)) / wsum
    bg_level = ((1 - w).unsqueeze(-1) * x).sum(dim=(1, 2, 3)) / (1 - w).sum(dim=(1, 2, 3)).clamp_min(1e-6)[:, None]
    return torch.cat([cx, cy, area, mean_rgb, var_rgb.sqrt(), bg_level], dim=1).double()


class ToyAccuracy(Metric):
    """Per-attribute and joint accuracy of generated toy videos against the attributes in their captions.

    Direction is also split into its two parts, so a model that gets the motion axis right but picks the sign at
    random shows as such: `axis` (the axis of motion matches the caption's) and `sign` (the direction is right,
    among the videos whose axis is right; 0.5 is a random sign, 1.0 a sign bound to the caption).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in (*ATTRIBUTES, "joint", "axis"):
            self.add_state(f"correct_{name}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, captions: list[str]) -> None:
        preds = classify(videos)
        for pred, caption in zip(preds, captions, strict=True):
            target = parse_caption(caption)
            hits = [pred[a] == target[a] for a in ATTRIBUTES]
            for a, hit in zip(ATTRIBUTES, hits, strict=True):
                setattr(self, f"correct_{a}", getattr(self, f"correct_{a}") + int(hit))
            self.correct_joint += int(all(hits))
            axis = AXIS.get(pred["direction"])
            self.correct_axis += int(axis is not None and axis == AXIS[target["direction"]])
        self.total += len(captions)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp_min(1).double()
        out = {name: getattr(self, f"correct_{name}").double() / total for name in (*ATTRIBUTES, "joint", "axis")}
        out["sign"] = self.correct_direction.double() / self.correct_axis.clamp_min(1).double()
        return out

"""`benchmarks/toy_speckle_probe.py`: its far-background mask and per-shape rows on rendered toy videos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from tmd_lightning.data.toy_world import BACKGROUND, all_captions, parse_caption, random_spec, render

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_speckle_probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("toy_speckle_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _videos(shape: str, count: int = 8) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(0)
    captions = [c for c in all_captions() if parse_caption(c)["shape"] == shape][:count]
    return torch.from_numpy(np.stack([render(random_spec(rng, **parse_caption(c))) for c in captions])), captions


def test_rendered_videos_have_no_far_background_speckle_and_every_shape_right():
    probe = _probe()
    for shape in ("square", "circle", "triangle"):
        videos, captions = _videos(shape)
        far = probe.far_background(videos)
        assert 0.3 < far.float().mean() < 0.95  # the shape and its margin are excluded, the rest is background
        assert (videos[far] == torch.tensor(BACKGROUND, dtype=torch.uint8)).all()
        row = probe.shape_row(videos, captions)
        assert row[f"acc_{shape}"] == 1.0


def test_background_speckle_turns_triangles_into_circles_and_cleaning_restores_them():
    """The failure the probe separates: faint speckle far from the shape lowers no pixel of the shape, yet the
    classifier's fill ratio rises past the triangle bound; setting the far background back restores every one."""
    probe = _probe()
    videos, captions = _videos("triangle")
    far = probe.far_background(videos)
    gen = torch.Generator().manual_seed(0)
    speckle = (torch.rand(videos.shape[:-1], generator=gen) < 0.3) & far  # 30 % of the far background
    noisy = videos.clone()
    noisy[speckle] = torch.tensor([60, 60, 60], dtype=torch.uint8)  # about 0.15 of the palette contrast
    assert probe.shape_row(noisy, captions)["acc_triangle"] < 0.5
    cleaned = torch.where(probe.far_background(noisy)[..., None],
                          torch.tensor(BACKGROUND, dtype=torch.uint8).expand_as(noisy), noisy)
    assert probe.shape_row(cleaned, captions)["acc_triangle"] == 1.0

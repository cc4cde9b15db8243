"""Collapse diagnostics against hand-built cases, numpy re-implementations and matplotlib's HSV conversion."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv

from tmd_lightning.metrics.diagnostics import (
    CollapseDiagnostics,
    colour_saturation,
    motion_magnitude,
    per_prompt_diversity,
    seed_diversity,
)


def _random(b: int, f: int = 3, h: int = 6, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, f, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _solid(value: tuple[int, int, int] | int, b: int = 1, f: int = 3, h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.uint8).expand(b, f, h, w, 3).clone()


def _np_motion(videos: np.ndarray) -> np.ndarray:
    x = videos.astype(np.float64) / 255
    return np.abs(np.diff(x, axis=1)).reshape(len(x), -1).mean(axis=1)


def _np_diversity(videos: np.ndarray, ids: list) -> float:
    x = videos.astype(np.float64) / 255
    per_prompt = []
    for pid in dict.fromkeys(ids):
        idx = [i for i, p in enumerate(ids) if p == pid]
        if len(idx) >= 2:
            per_prompt.append(np.mean([np.abs(x[i] - x[j]).mean() for i, j in itertools.combinations(idx, 2)]))
    return float(np.mean(per_prompt))


# --- motion ---------------------------------------------------------------------------------------------------------


def test_static_video_has_zero_motion() -> None:
    static = _random(2, f=1).expand(2, 5, 6, 5, 3).clone()
    assert torch.equal(motion_magnitude(static, per_video=True), torch.zeros(2))


def test_moving_square_has_exact_motion() -> None:
    # A white 2x2 square moving one pixel right per frame on black 8x8: each step changes 2 columns of 2 pixels
    # (4 of 64 pixels) by 1 in every channel, so motion = 4 / 64.
    video = torch.zeros(1, 4, 8, 8, 3, dtype=torch.uint8)
    for t in range(4):
        video[0, t, 3:5, t : t + 2] = 255
    assert motion_magnitude(video).item() == pytest.approx(4 / 64, abs=1e-7)
    # A uniform brightness ramp of 10 levels per frame moves by exactly 10/255.
    ramp = torch.stack([_solid(10 * t, f=1)[0, 0] for t in range(5)])[None]
    assert motion_magnitude(ramp).item() == pytest.approx(10 / 255, abs=1e-7)


def test_motion_matches_numpy() -> None:
    videos = _random(4, f=5)
    expected = _np_motion(videos.numpy())
    np.testing.assert_allclose(motion_magnitude(videos, per_video=True).numpy(), expected, rtol=1e-5)
    assert motion_magnitude(videos).item() == pytest.approx(expected.mean(), rel=1e-5)


def test_motion_needs_two_frames_and_uint8() -> None:
    with pytest.raises(ValueError, match="2 frames"):
        motion_magnitude(_random(1, f=1))
    with pytest.raises(ValueError, match="uint8"):
        motion_magnitude(_random(1).float())


# --- diversity ------------------------------------------------------------------------------------------------------


def test_identical_seeds_have_zero_diversity() -> None:
    one = _random(1, seed=3)
    assert seed_diversity(torch.cat([one, one, one]), ["p", "p", "p"]).item() == 0.0


def test_diversity_hand_built() -> None:
    # Prompt a: levels 0, 51, 102 -> pair distances 0.2, 0.4, 0.2 -> 0.8 / 3. Prompt b: 0 vs 255 -> 1.
    # Prompt c has one video and is skipped; the result is the mean over prompts a and b.
    videos = torch.cat([_solid(0), _solid(51), _solid(102), _solid(0), _solid(255), _solid(7)])
    ids = ["a", "a", "a", "b", "b", "c"]
    torch.testing.assert_close(per_prompt_diversity(videos, ids), torch.tensor([0.8 / 3, 1.0]))
    assert seed_diversity(videos, ids).item() == pytest.approx((0.8 / 3 + 1.0) / 2, abs=1e-7)


def test_diversity_matches_numpy_with_tensor_ids() -> None:
    videos = _random(7, seed=5)
    ids = [3, 1, 3, 2, 1, 3, 4]
    expected = _np_diversity(videos.numpy(), ids)
    assert seed_diversity(videos, torch.tensor(ids)).item() == pytest.approx(expected, rel=1e-5)


def test_diversity_needs_a_prompt_with_two_videos() -> None:
    with pytest.raises(ValueError, match="two or more videos"):
        seed_diversity(_random(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="one prompt id per video"):
        seed_diversity(_random(3), ["a", "a"])


# --- saturation -----------------------------------------------------------------------------------------------------


def test_saturation_grey_black_and_primaries() -> None:
    assert colour_saturation(_solid((128, 128, 128))).item() == 0.0
    assert colour_saturation(_solid((0, 0, 0))).item() == 0.0  # black: max is 0, saturation defined as 0
    assert colour_saturation(_solid((255, 0, 0))).item() == 1.0
    assert colour_saturation(_solid((0, 0, 200))).item() == 1.0
    assert colour_saturation(_solid((200, 100, 50))).item() == pytest.approx(150 / 200)


def test_saturation_matches_matplotlib() -> None:
    videos = _random(3, seed=7)
    videos[0, 0, 0, :2] = 0  # include black pixels
    hsv = rgb_to_hsv(videos.numpy().astype(np.float64) / 255)
    expected = hsv[..., 1].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(colour_saturation(videos, per_video=True).numpy(), expected, rtol=1e-5)


# --- metric ---------------------------------------------------------------------------------------------------------


def test_collapse_diagnostics_accumulates_over_updates() -> None:
    a, b = _random(4, seed=8), _random(3, seed=9)
    ids_a, ids_b = ["x", "x", "y", "z"], ["u", "u", "u"]
    metric = CollapseDiagnostics()
    metric.update(a, ids_a)
    metric.update(b, ids_b)
    out = metric.compute()
    both = torch.cat([a, b]).numpy()
    assert set(out) == {"motion", "diversity", "saturation"}
    assert out["motion"].item() == pytest.approx(_np_motion(both).mean(), rel=1e-5)
    sat = rgb_to_hsv(both.astype(np.float64) / 255)[..., 1].reshape(7, -1).mean(axis=1).mean()
    assert out["saturation"].item() == pytest.approx(sat, rel=1e-5)
    # Two prompts with pairs: x (batch a) and u (batch b); diversity is their mean.
    expected = (_np_diversity(a.numpy(), ids_a) + _np_diversity(b.numpy(), ids_b)) / 2
    assert out["diversity"].item() == pytest.approx(expected, rel=1e-5)
    assert int(metric.n_prompts) == 2 and int(metric.n_videos) == 7


def test_collapse_diagnostics_without_pairs_and_reset() -> None:
    metric = CollapseDiagnostics()
    metric.update(_random(2, seed=10), ["a", "b"])
    metric.update(_random(2, seed=11))
    out = metric.compute()
    assert torch.isnan(out["diversity"]) and torch.isfinite(out["motion"])
    metric.reset()
    static = _solid((255, 0, 0), b=2)
    metric.update(static, [0, 0])
    out = metric.compute()
    assert out["motion"].item() == 0.0 and out["diversity"].item() == 0.0 and out["saturation"].item() == 1.0

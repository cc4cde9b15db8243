"""Analytic toy metrics (docs/method.md §6): >= 0.98 per attribute on real toy videos, sane edge cases, toy-FD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tmd_lightning.data.backends import PyAVBackend
from tmd_lightning.data.manifest import read_manifest
from tmd_lightning.data.toy_world import BACKGROUND, COLOURS, all_captions, generate_toy_dataset, parse_caption
from tmd_lightning.metrics.frechet import frechet_distance, gaussian_stats
from tmd_lightning.metrics.toy import ATTRIBUTES, ToyAccuracy, classify, direction_confusion, toy_features


def _load(manifest) -> tuple[torch.Tensor, list[str]]:
    entries = read_manifest(manifest)
    backend = PyAVBackend()
    videos = torch.stack([torch.from_numpy(backend.read(e.path, 9)) for e in entries])
    return videos, [e.caption for e in entries]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """{size: (videos, captions)}: 4 decoded H.264 toy videos per caption, at 16 and 32 px."""
    root = tmp_path_factory.mktemp("toy_metrics")
    return {size: _load(generate_toy_dataset(root / str(size), 4, 9, size, seed=0)) for size in (16, 32)}


@pytest.fixture(scope="module")
def real16_other(tmp_path_factory):
    """A second, independent real set at 16 px (another seed)."""
    root = tmp_path_factory.mktemp("toy_metrics_b")
    return _load(generate_toy_dataset(root, 4, 9, 16, seed=1))


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(frechet_distance(*gaussian_stats(toy_features(a)), *gaussian_stats(toy_features(b))))


@pytest.mark.parametrize("size", [16, 32])
def test_accuracy_on_real_toy_videos(real, size):
    videos, captions = real[size]
    assert videos.shape == (192, 9, size, size, 3) and videos.dtype == torch.uint8
    metric = ToyAccuracy()
    metric.update(videos, captions)
    scores = metric.compute()
    assert set(scores) == {*ATTRIBUTES, "joint", "axis", "sign"}
    for name in (*ATTRIBUTES, "axis", "sign"):
        assert float(scores[name]) >= 0.98, (size, name, float(scores[name]))
    assert float(scores["joint"]) >= 0.96
    assert int(metric.total) == 192


@pytest.mark.parametrize("size", [16, 32])
def test_every_caption_class_is_recognised(real, size):
    """Per attribute value (not just overall): each colour/shape/direction is mostly right."""
    videos, captions = real[size]
    preds = classify(videos)
    for attr in ATTRIBUTES:
        values = {parse_caption(c)[attr] for c in all_captions()}
        for value in values:
            idx = [i for i, c in enumerate(captions) if parse_caption(c)[attr] == value]
            hits = sum(preds[i][attr] == value for i in idx)
            assert hits >= 0.95 * len(idx), (size, attr, value, hits, len(idx))


def test_accuracy_is_low_for_wrong_captions(real):
    """The metric can fail: captions shifted against the videos score far below 0.98."""
    videos, captions = real[16]
    metric = ToyAccuracy()
    metric.update(videos, captions[4:] + captions[:4])  # caption of the next caption class
    scores = metric.compute()
    assert float(scores["direction"]) < 0.1  # next caption always has another direction
    assert float(scores["joint"]) < 0.1


def test_all_background_video_classifies_as_none():
    video = torch.tensor(BACKGROUND, dtype=torch.uint8).expand(2, 9, 16, 16, 3).clone()
    video[1, :, 3:6, 3:6] = torch.tensor(BACKGROUND, dtype=torch.uint8) + 3  # faint noise stays background
    for pred in classify(video):
        assert pred == {"colour": None, "shape": None, "direction": None}
    metric = ToyAccuracy()
    metric.update(video, ["a red square moving left"] * 2)
    assert all(float(v) == 0.0 for v in metric.compute().values())
    assert int(metric.total) == 2


def test_shape_visible_in_one_frame_only_is_none():
    video = torch.tensor(BACKGROUND, dtype=torch.uint8).expand(1, 9, 16, 16, 3).clone()
    video[0, 4, 4:10, 4:10] = torch.tensor(COLOURS["red"], dtype=torch.uint8)
    assert classify(video)[0]["direction"] is None  # no motion can be read from a single frame


def _recolour(videos: torch.Tensor, captions: list[str], new_rgb: tuple[float, float, float]) -> torch.Tensor:
    """Replaces each video's shape colour: coverage from its own palette colour, re-blended over the background."""
    bg = torch.tensor(BACKGROUND, dtype=torch.float64)
    out = []
    for video, caption in zip(videos, captions, strict=True):
        fg = torch.tensor(COLOURS[parse_caption(caption)["colour"]], dtype=torch.float64)
        d = fg - bg
        cov = ((video.double() - bg) @ d / (d @ d)).clamp(0, 1)[..., None]
        out.append((bg * (1 - cov) + torch.tensor(new_rgb, dtype=torch.float64) * cov).round().clamp(0, 255))
    return torch.stack(out).to(torch.uint8)


@pytest.mark.parametrize("target", list(COLOURS))
def test_recoloured_video_gets_the_new_palette_colour(real, target):
    videos, captions = real[16]
    idx = list(range(0, 192, 8))  # 24 videos, all source colours, shapes and directions
    vids, caps = videos[idx], [captions[i] for i in idx]
    # off-palette shade of the target (up to 20 levels away in each channel): nearest palette colour is still it
    rgb = tuple(float(np.clip(c + o, 0, 255)) for c, o in zip(COLOURS[target], (18, -20, 15), strict=True))
    preds = classify(_recolour(vids, caps, rgb))
    assert [p["colour"] for p in preds] == [target] * len(idx)
    # recolouring must not change what the other classifiers see
    orig = classify(vids)
    same = sum(p["direction"] == o["direction"] for p, o in zip(preds, orig, strict=True))
    assert same == len(idx)


def test_channel_swap_changes_colour(real):
    """Swapping R and G of real red videos makes them (nearest) green; the background is grey so it is unchanged."""
    videos, captions = real[16]
    idx = [i for i, c in enumerate(captions) if parse_caption(c)["colour"] == "red"]
    swapped = videos[idx][..., [1, 0, 2]]
    preds = classify(swapped)
    assert sum(p["colour"] == "green" for p in preds) >= 0.98 * len(idx)


def test_accuracy_merges_two_halves(real):
    videos, captions = real[16]
    # make some captions wrong so the scores are not all 1 and a bad merge would show
    captions = list(captions)
    for i in range(0, 192, 5):
        captions[i] = all_captions()[(all_captions().index(captions[i]) + 1) % 48]
    once = ToyAccuracy()
    once.update(videos, captions)
    expected = once.compute()
    assert 0.5 < float(expected["joint"]) < 0.95

    twice = ToyAccuracy()
    twice.update(videos[:77], captions[:77])
    twice.update(videos[77:], captions[77:])
    got = twice.compute()

    a, b = ToyAccuracy(), ToyAccuracy()
    a.update(videos[:100], captions[:100])
    b.update(videos[100:], captions[100:])
    a.merge_state(b)
    merged = a.compute()

    for name in (*ATTRIBUTES, "joint"):
        assert float(got[name]) == pytest.approx(float(expected[name]), abs=1e-12)
        assert float(merged[name]) == pytest.approx(float(expected[name]), abs=1e-12)
    assert int(twice.total) == int(a.total) == 192

    once.reset()
    assert int(once.total) == 0


def test_accuracy_joint_needs_all_three(real):
    videos, captions = real[16]
    idx = list(range(0, 192, 4))
    vids, caps = videos[idx], [captions[i] for i in idx]
    preds = classify(vids)
    # flip the colour in the caption only: colour and joint drop to ~0, shape and direction stay
    names = list(COLOURS)
    wrong = [
        f"a {names[(names.index(p['colour']) + 1) % 4]} {parse_caption(c)['shape']} moving "
        f"{parse_caption(c)['direction']}"
        for p, c in zip(preds, caps, strict=True)
    ]
    metric = ToyAccuracy()
    metric.update(vids, wrong)
    scores = metric.compute()
    assert float(scores["colour"]) == 0.0 and float(scores["joint"]) == 0.0
    assert float(scores["shape"]) >= 0.95 and float(scores["direction"]) >= 0.95


# ---------------------------------------------------------------------------------------------------- toy-FD


def test_toy_features_shape_and_dtype(real):
    videos, _ = real[16]
    feats = toy_features(videos[:10])
    assert feats.dtype == torch.float64
    assert feats.shape == (10, 3 * 9 + 9)  # cx, cy, area per frame + mean/std colour + background level
    assert torch.isfinite(feats).all()
    # features are per video: a batch gives the same rows as single videos
    torch.testing.assert_close(feats[3:4], toy_features(videos[3:4]))


def test_toy_fd_real_vs_corrupted(real, real16_other):
    a, _ = real[16]
    b, _ = real16_other
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([v[torch.randperm(9, generator=g)] for v in b])
    static = b[:, :1].expand_as(b).clone()
    recoloured = b.clone()
    recoloured[..., 2] = (recoloured[..., 2].int() // 2).to(torch.uint8)

    fd_real = _fd(a, b)
    assert _fd(a, a) == pytest.approx(0.0, abs=1e-9)
    for name, corrupted in (("shuffled", shuffled), ("static", static), ("recoloured", recoloured)):
        fd_bad = _fd(a, corrupted)
        assert fd_bad > 3 * fd_real, (name, fd_bad, fd_real)
    assert _fd(a, b) == pytest.approx(_fd(b, a), rel=1e-6)


def test_axis_and_sign_separate_a_random_sign_from_a_wrong_axis(real):
    """Time-reversed real videos: the axis stays right, the sign is always wrong (sign 0); a half-reversed set has
    sign 0.5 with axis 1, which plain direction accuracy (0.5) cannot tell from a random axis."""
    videos, captions = real[16]
    metric = ToyAccuracy()
    metric.update(videos.flip(1), captions)
    scores = metric.compute()
    assert float(scores["axis"]) >= 0.98 and float(scores["sign"]) <= 0.02 and float(scores["direction"]) <= 0.02
    half = torch.cat([videos[::2], videos[1::2].flip(1)])
    metric = ToyAccuracy()
    metric.update(half, captions[::2] + captions[1::2])
    scores = metric.compute()
    assert float(scores["axis"]) >= 0.98 and abs(float(scores["sign"]) - 0.5) <= 0.02


def test_direction_probe_is_diagonal_on_real_videos_and_mirrored_on_time_reversed_ones(real):
    videos, captions = real[16]
    probe = direction_confusion(videos, captions)
    per_word = len(captions) // 4
    assert set(probe) == {"left", "right", "up", "down"}
    for word, row in probe.items():
        assert sum(row.values()) == per_word and row[word] >= per_word - 1  # (>= 0.98 accuracy over 48)
    reversed_probe = direction_confusion(videos.flip(1), captions)  # played backwards: every sign swaps
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for word, row in reversed_probe.items():
        assert row[opposite[word]] >= per_word - 1

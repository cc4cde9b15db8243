"""The procedural toy world (docs/method.md §6): caption grammar, rendering, MP4 + manifest generation."""

from __future__ import annotations

import csv
import itertools
import json
import re

import numpy as np
import pytest

from tmd_lightning.data.toy_world import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ToyVideoSpec,
    all_captions,
    generate_toy_dataset,
    parse_caption,
    random_spec,
    render,
)

CAPTION_RE = re.compile(r"^a (red|green|blue|yellow) (square|circle|triangle) moving (left|right|up|down)$")


def _coverage(video: np.ndarray, colour: str) -> np.ndarray:
    """(F, H, W) shape coverage in [0, 1] recovered from a rendered video, via its highest-contrast channel."""
    bg, fg = np.asarray(BACKGROUND, float), np.asarray(COLOURS[colour], float)
    c = int(np.argmax(np.abs(fg - bg)))
    return (video[..., c].astype(float) - bg[c]) / (fg[c] - bg[c])


def _centroids(cov: np.ndarray) -> np.ndarray:
    """(F, 2) coverage-weighted (x, y) centroid per frame in pixel-centre units."""
    f, h, w = cov.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mass = cov.sum(axis=(1, 2))
    return np.stack([(cov * xs).sum(axis=(1, 2)) / mass, (cov * ys).sum(axis=(1, 2)) / mass], axis=1)


# ---------------------------------------------------------------------------------------------------- captions


def test_all_captions_is_the_full_grammar():
    caps = all_captions()
    assert len(caps) == 48
    assert len(set(caps)) == 48
    for cap in caps:
        assert CAPTION_RE.match(cap), cap
    expected = {f"a {c} {s} moving {d}" for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)}
    assert set(caps) == expected
    assert caps == all_captions()  # fixed order


def test_parse_caption_round_trip():
    for cap in all_captions():
        attrs = parse_caption(cap)
        assert set(attrs) == {"colour", "shape", "direction"}
        assert f"a {attrs['colour']} {attrs['shape']} moving {attrs['direction']}" == cap
    assert parse_caption("a blue circle moving up") == {"colour": "blue", "shape": "circle", "direction": "up"}


def test_spec_caption_matches_grammar():
    spec = random_spec(np.random.default_rng(0), "green", "triangle", "down")
    assert spec.caption == "a green triangle moving down"
    assert parse_caption(spec.caption) == {"colour": "green", "shape": "triangle", "direction": "down"}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a red square moving",
        "a red square moving left now",
        "the red square moving left",
        "a red square going left",
        "a purple square moving left",
        "a red hexagon moving left",
        "a red square moving sideways",
        "a square red moving left",
    ],
)
def test_parse_caption_rejects_non_grammar(bad):
    with pytest.raises(ValueError, match="not a toy caption"):
        parse_caption(bad)


# ---------------------------------------------------------------------------------------------------- random_spec


def test_random_spec_keeps_shape_on_canvas_over_many_seeds():
    p = np.linspace(0, 1, 9)
    for seed in range(300):
        rng = np.random.default_rng(seed)
        for direction in DIRECTIONS:
            spec = random_spec(rng, "red", "square", direction)
            assert 0.3 <= spec.size <= 0.4
            assert 0.3 <= spec.travel <= 0.45
            dx, dy = DIRECTIONS[direction]
            cx, cy = spec.start_x + dx * spec.travel * p, spec.start_y + dy * spec.travel * p
            half = spec.size / 2
            for c in (cx, cy):
                assert (c - half).min() >= -1e-12 and (c + half).max() <= 1 + 1e-12, spec


def test_random_spec_is_deterministic_per_rng_seed():
    a = random_spec(np.random.default_rng(7), "red", "square", "left")
    b = random_spec(np.random.default_rng(7), "red", "square", "left")
    c = random_spec(np.random.default_rng(8), "red", "square", "left")
    assert a == b
    assert a != c


# ---------------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("size", [16, 32])
def test_render_shape_dtype_and_background(size):
    # shape near the top-left corner moving right: the bottom-right corner is far from it in every frame
    spec = ToyVideoSpec("blue", "square", "right", size=0.3, travel=0.3, start_x=0.2, start_y=0.2)
    video = render(spec, num_frames=9, size=size)
    assert video.shape == (9, size, size, 3)
    assert video.dtype == np.uint8
    assert (video[:, -3:, -3:] == np.asarray(BACKGROUND, np.uint8)).all()
    # and the shape's interior is exactly the palette colour
    assert (video[0, size // 5, size // 5] == np.asarray(COLOURS["blue"], np.uint8)).all()


def test_render_colours_are_between_background_and_palette():
    for colour in COLOURS:
        spec = ToyVideoSpec(colour, "circle", "down", size=0.35, travel=0.4, start_x=0.5, start_y=0.25)
        video = render(spec).reshape(-1, 3).astype(float)
        bg, fg = np.asarray(BACKGROUND, float), np.asarray(COLOURS[colour], float)
        # every pixel is bg + a (fg - bg) with a in [0, 1] (anti-aliased blend of exactly two colours)
        a = (video - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
        assert a.min() >= -0.01 and a.max() <= 1.01
        assert np.abs(bg + a[:, None] * (fg - bg) - video).max() <= 1.0  # only uint8 rounding off the line


@pytest.mark.parametrize("size", [16, 32])
def test_rendered_shape_is_never_clipped(size):
    """With specs from random_spec, the foreground area is the same in every frame (nothing leaves the canvas)."""
    rng = np.random.default_rng(99)
    for colour, shape, direction in itertools.product(COLOURS, SHAPES, DIRECTIONS):
        spec = random_spec(rng, colour, shape, direction)
        cov = _coverage(render(spec, 9, size), colour)
        area = cov.sum(axis=(1, 2))
        ideal = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape] * (spec.size * size) ** 2
        np.testing.assert_allclose(area, ideal, rtol=0.04, err_msg=str(spec))


def test_rendered_shape_is_clipped_when_off_canvas():
    """The clipping check above can fail: a spec that leaves the canvas loses area."""
    spec = ToyVideoSpec("red", "square", "right", size=0.4, travel=0.45, start_x=0.7, start_y=0.5)
    area = _coverage(render(spec, 9, 16), "red").sum(axis=(1, 2))
    assert area[-1] < 0.7 * area[0]


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_render_motion_direction_and_distance(size, direction):
    rng = np.random.default_rng(list(DIRECTIONS).index(direction) + 10 * size)
    for shape in SHAPES:
        spec = random_spec(rng, "yellow", shape, direction)
        track = _centroids(_coverage(render(spec, 9, size), "yellow"))
        dx, dy = DIRECTIONS[direction]
        step = track[-1] - track[0]
        expected = np.array([dx, dy]) * spec.travel * size
        np.testing.assert_allclose(step, expected, atol=0.05 * size * spec.travel + 0.1)
        # constant speed: frame-to-frame displacements are all about travel / (F - 1)
        per_frame = np.diff(track, axis=0)
        np.testing.assert_allclose(per_frame, np.broadcast_to(expected / 8, per_frame.shape), atol=0.15)


def test_render_frame_count_and_static_first_frame():
    spec = ToyVideoSpec("green", "circle", "left", size=0.35, travel=0.4, start_x=0.7, start_y=0.5)
    v5, v9 = render(spec, 5, 16), render(spec, 9, 16)
    assert v5.shape[0] == 5 and v9.shape[0] == 9
    np.testing.assert_array_equal(v5[0], v9[0])  # both start at start_x
    np.testing.assert_array_equal(v5[-1], v9[-1])  # and both end after the full travel


# ---------------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def toy16(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy16")
    return root, generate_toy_dataset(root, videos_per_caption=1, num_frames=9, size=16, seed=0)


def _read_rows(manifest):
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_writes_mp4s_and_manifest(toy16):
    root, manifest = toy16
    assert manifest == root / "train" / "manifest.csv"
    rows = _read_rows(manifest)
    assert len(rows) == 48
    assert [r["caption"] for r in rows] == all_captions()
    for r in rows:
        path = manifest.parent / r["path"]
        assert not r["path"].startswith("/")  # relative to the manifest
        assert path.suffix == ".mp4" and path.is_file() and path.stat().st_size > 100
        assert path.read_bytes()[4:8] == b"ftyp"  # an ISO-BMFF (MP4) container
        assert (r["num_frames"], r["height"], r["width"], r["fps"]) == ("9", "16", "16", "8")
    assert len(list((root / "train" / "videos").glob("*.mp4"))) == 48


def test_generate_reuses_existing_dataset(toy16):
    root, manifest = toy16
    files = [manifest, *sorted((root / "train" / "videos").glob("*.mp4"))]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = generate_toy_dataset(root, videos_per_caption=1, num_frames=9, size=16, seed=0)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_generate_regenerates_when_params_change(tmp_path):
    manifest = generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=5, size=16, seed=0)
    first = manifest.parent / _read_rows(manifest)[0]["path"]
    content = first.read_bytes()
    # different seed -> different specs -> rewritten files and stamp
    manifest2 = generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=5, size=16, seed=1)
    assert manifest2 == manifest
    assert first.read_bytes() != content
    assert json.loads((manifest.parent / "toy_world.json").read_text())["seed"] == 1
    # more videos per caption -> a bigger manifest
    generate_toy_dataset(tmp_path, videos_per_caption=2, num_frames=5, size=16, seed=1)
    rows = _read_rows(manifest)
    assert len(rows) == 96
    assert all((manifest.parent / r["path"]).is_file() for r in rows)


def test_generate_rewrites_when_manifest_deleted(tmp_path):
    manifest = generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=5, size=16, seed=0)
    manifest.unlink()
    assert generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=5, size=16, seed=0).is_file()


def test_generate_splits_are_separate(tmp_path):
    train = generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=5, size=16, seed=0, split="train")
    val = generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=5, size=16, seed=1, split="val")
    assert train.parent != val.parent and train.is_file() and val.is_file()
    t0 = (train.parent / _read_rows(train)[0]["path"]).read_bytes()
    v0 = (val.parent / _read_rows(val)[0]["path"]).read_bytes()
    assert t0 != v0  # different seeds give different videos


def test_generate_at_32px(tmp_path):
    from tmd_lightning.data.backends import PyAVBackend

    manifest = generate_toy_dataset(tmp_path, videos_per_caption=1, num_frames=9, size=32, seed=0)
    rows = _read_rows(manifest)
    assert len(rows) == 48
    assert {(r["height"], r["width"]) for r in rows} == {("32", "32")}
    frames = PyAVBackend().read(manifest.parent / rows[0]["path"], 9)
    assert frames.shape == (9, 32, 32, 3)
    # the generated video is the render of the first spec drawn with the dataset's seed
    spec = random_spec(np.random.default_rng(0), **parse_caption(rows[0]["caption"]))
    assert np.abs(frames.astype(int) - render(spec, 9, 32)).mean() < 3

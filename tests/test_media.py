"""What people open: sample MP4s (yuv420p, upscaled, named by prompt and seed), the contact sheet and the GIF grid (the
Pareto plot: tests/evaluation/test_eval_report.py)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tmd_lightning.data.toy_world import parse_caption, random_spec, render
from tmd_lightning.media import (
    contact_sheet,
    contact_sheet_size,
    gif_grid,
    slug,
    video_names,
    write_run_media,
    write_viewable_mp4,
)

PROMPTS = ["a red circle moving left", "a blue square moving up"]


def _videos(pairs: list[tuple[str, int]], size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render(random_spec(rng, **parse_caption(p)), 9, size) for p, _ in pairs]


def _decode(path: Path) -> tuple[str, int, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream.codec_context.pix_fmt, stream.codec_context.width, stream.codec_context.height, len(frames)


def test_sample_mp4_is_yuv420p_and_nearest_upscaled(tmp_path: Path) -> None:
    video = _videos([(PROMPTS[0], 0)])[0]
    path = write_viewable_mp4(tmp_path / "a.mp4", video, fps=8)
    assert _decode(path) == ("yuv420p", 256, 256, 9)  # 16 px x 16
    with av.open(str(path)) as container:  # whole pixels: the middle of a 16x16 block is the original colour
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(first[8::16, 8::16].astype(int) - video[0].astype(int)).max() <= 12


def test_large_odd_video_is_not_downscaled_but_made_even(tmp_path: Path) -> None:
    video = np.random.default_rng(0).integers(0, 255, (5, 301, 300, 3), dtype=np.uint8)
    path = write_viewable_mp4(tmp_path / "b.mp4", video, fps=8, min_side=256)
    assert _decode(path) == ("yuv420p", 300, 302, 5)
    small = write_viewable_mp4(tmp_path / "c.mp4", video[:, :33, :20], fps=8, min_side=100)  # x5: 165 x 100 -> even
    assert _decode(small) == ("yuv420p", 100, 166, 5)


def test_names_carry_prompt_slug_and_seed_and_never_collide() -> None:
    assert slug("A red circle, moving LEFT!") == "a-red-circle-moving-left"
    assert slug("../../etc/passwd") == "etc-passwd" and slug("???") == "video"
    names = video_names([("a red circle moving left", 0), ("A red circle moving left!", 0), (PROMPTS[0], 1),
                         (PROMPTS[0], 0), ("x" * 200, 3)])
    assert names[:4] == ["a-red-circle-moving-left_seed0.mp4", "a-red-circle-moving-left_seed0_2.mp4",
                         "a-red-circle-moving-left_seed1.mp4", "a-red-circle-moving-left_seed0_3.mp4"]
    assert names[4] == "x" * 60 + "_seed3.mp4" and len(set(names)) == len(names)


def test_contact_sheet_has_one_labelled_row_per_video(tmp_path: Path) -> None:
    pairs = [(p, s) for p in PROMPTS for s in (0, 1, 2)]
    sheet = contact_sheet(tmp_path / "sheet.png", _videos(pairs), [f"{p} (seed {s})" for p, s in pairs], tile=64)
    image = Image.open(sheet)
    # 9 frames of 64 px with 4 px gaps; 6 rows of a 14 px label + 64 px frames + 4 px gap
    assert image.size == contact_sheet_size(6, 9, 16, 16, 64) == (4 + 9 * 68, 4 + 6 * (14 + 64 + 4))
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels[4:18, 4:200] < 128).any()  # the first row's label is drawn above its frames


def test_gif_grid_has_every_frame_and_all_videos(tmp_path: Path) -> None:
    pairs = [(p, s) for p in PROMPTS for s in (0, 1, 2)]
    videos = _videos(pairs)
    videos[0][:] = videos[0][0]  # a still video: its identical frames must not be merged away
    path = gif_grid(tmp_path / "grid.gif", videos, PROMPTS, ["seed 0", "seed 1", "seed 2"], fps=8, tile=32)
    image = Image.open(path)
    assert image.n_frames == 9 and image.info["loop"] == 0
    assert image.size == (160 + 4 + 3 * (32 + 4), 2 * 14 + 4 + 2 * (32 + 4) + 4)
    with pytest.raises(ValueError, match="do not fit"):
        gif_grid(tmp_path / "bad.gif", videos, PROMPTS[:1], ["seed 0"])


def test_run_media_writes_named_mp4s_sheet_and_grid(tmp_path: Path) -> None:
    pairs = [(p, s) for p in PROMPTS for s in (0, 7)]
    media = write_run_media(tmp_path, pairs, _videos(pairs), fps=8, min_side=64, tile=32)
    assert media["videos"] == ["a-red-circle-moving-left_seed0.mp4", "a-red-circle-moving-left_seed7.mp4",
                               "a-blue-square-moving-up_seed0.mp4", "a-blue-square-moving-up_seed7.mp4"]
    assert media["size"] == (64, 64)
    for name in media["videos"]:
        assert _decode(tmp_path / name) == ("yuv420p", 64, 64, 9)
    assert Image.open(media["contact_sheet"]).size == contact_sheet_size(4, 9, 16, 16, 32)
    assert Image.open(media["grid"]).n_frames == 9

"""Sample videos people can open: yuv420p MP4s at a viewable size, named by prompt and seed, a labelled contact
sheet (PNG) and an animated GIF grid per run.

The toy's 16x16 px samples are upscaled with nearest neighbour (whole pixels, no blur) to `min_side` px on the short
side; videos already that large are never downscaled. Width and height are made even (yuv420p needs it) by
repeating the last row/column. The training data (`toy_world.write_mp4`) keeps its own 4:4:4 encoding: it is read
back by the data pipeline, not watched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MIN_SIDE = 256  # default short side of a written sample MP4 (px)


def scale_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """The whole-number nearest-neighbour factor that brings the short side to at least `min_side` (1: no change)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """(..., H, W, C) frames, each pixel repeated `factor` times along H and W."""
    if factor == 1:
        return frames
    return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def even(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, C) frames padded (edge pixels repeated) to an even height and width."""
    h, w = frames.shape[-3], frames.shape[-2]
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def viewable_size(height: int, width: int, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(height, width) of a video of that size once `viewable` made it so."""
    f = scale_factor(height, width, min_side)
    return height * f + height * f % 2, width * f + width * f % 2


def viewable(frames: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """(F, H, W, 3) uint8 frames as written to a sample MP4: upscaled (never down) and even-sized."""
    return even(upscale(frames, scale_factor(frames.shape[1], frames.shape[2], min_side)))


def write_h264(path: str | Path, frames: np.ndarray, fps: int, crf: int, pix_fmt: str = "yuv420p",
               faststart: bool = False) -> Path:
    """Writes (F, H, W, 3) uint8 frames as H.264 in `pix_fmt` (the one encoder behind every MP4 the project writes:
    yuv420p for people, yuv444p for the toy training data); `faststart` puts the index at the front of the file."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_viewable_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, min_side: int = MIN_SIDE,
                       crf: int = 17) -> Path:
    """Writes (F, H, W, 3) uint8 frames as H.264 yuv420p (browsers, QuickTime, VS Code), nearest-upscaled to
    `min_side` px on the short side, with the index at the front of the file (`+faststart`)."""
    return write_h264(path, viewable(np.asarray(frames, dtype=np.uint8), min_side), fps, crf, "yuv420p", True)


def slug(text: str, max_length: int = 60) -> str:
    """A filesystem-safe name for a prompt: lower-case ASCII letters, digits and `-`, at most `max_length` long."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_length].rstrip("-") or "video"


def video_names(pairs: Sequence[tuple[str, int]], suffix: str = ".mp4", max_length: int = 60) -> list[str]:
    """`<slug of prompt>_seed<n><suffix>` for every (prompt, seed); a name that comes again (the same pair twice, two
    prompts with the same slug, long prompts cut to the same prefix) gets `_2`, `_3`, ... before the suffix."""
    names, used = [], set()
    for prompt, seed in pairs:
        stem = f"{slug(prompt, max_length)}_seed{seed}"
        name, k = stem + suffix, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}{suffix}"
        used.add(name)
        names.append(name)
    return names


# -- pictures ----------------------------------------------------------------------------------------------------------
PAD = 4  # px between tiles
TEXT_HEIGHT = 14  # px of one line of label text
BACKGROUND = (255, 255, 255)
BORDER = (40, 40, 40)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, width: int, font) -> str:
    """`text` cut (with an ellipsis) to fit `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, width: int, font, lines: int) -> list[str]:
    """`text` word-wrapped into at most `lines` lines of `width` px (the last one cut)."""
    out: list[str] = []
    words = text.split() if lines > 0 else []
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words:
        out[-1] = out[-1] + " " + " ".join(words)
    return [_fit(draw, line, width, font) for line in out]


def _tiles(videos: Sequence[np.ndarray], tile: int) -> tuple[list[np.ndarray], int, int]:
    """The videos nearest-upscaled to `tile` px on the short side (all one size: the first video's)."""
    h, w = videos[0].shape[1:3]
    factor = scale_factor(h, w, tile)
    return [upscale(np.asarray(v, dtype=np.uint8), factor) for v in videos], h * factor, w * factor


def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """`max_frames` evenly spaced frame indices (all frames when there are no more than that)."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (max_frames - 1)) for i in range(max_frames)]


def contact_sheet_size(num_videos: int, num_frames: int, height: int, width: int, tile: int = 64,
                       max_frames: int = 9) -> tuple[int, int]:
    """(width, height) in px of the contact sheet `contact_sheet` writes for these videos."""
    factor = scale_factor(height, width, tile)
    cols = len(frame_indices(num_frames, max_frames))
    return (PAD + cols * (width * factor + PAD), PAD + num_videos * (TEXT_HEIGHT + height * factor + PAD))


def contact_sheet(path: str | Path, videos: Sequence[np.ndarray], labels: Sequence[str], tile: int = 64,
                  max_frames: int = 9) -> Path:
    """A PNG with one row per (F, H, W, 3) uint8 video: its label (prompt, seed) above, then up to `max_frames`
    evenly spaced frames left to right, each nearest-upscaled to `tile` px on the short side."""
    from PIL import Image, ImageDraw

    if len(videos) != len(labels) or not videos:
        raise ValueError(f"contact_sheet: {len(videos)} videos and {len(labels)} labels (need as many, at least 1)")
    tiles, th, tw = _tiles(videos, tile)
    idx = frame_indices(tiles[0].shape[0], max_frames)
    size = contact_sheet_size(len(videos), videos[0].shape[0], *videos[0].shape[1:3], tile, max_frames)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(sheet), _font()
    y = PAD
    for video, label in zip(tiles, labels, strict=True):
        draw.text((PAD, y + 1), _fit(draw, label, size[0] - 2 * PAD, font), fill=(0, 0, 0), font=font)
        y += TEXT_HEIGHT
        for c, f in enumerate(idx):
            sheet.paste(Image.fromarray(video[f]), (PAD + c * (tw + PAD), y))
        y += th + PAD
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def gif_grid(path: str | Path, videos: Sequence[np.ndarray], row_labels: Sequence[str],
             col_labels: Sequence[str], fps: int = 8, tile: int = 64, label_width: int = 160,
             header_lines: int = 2) -> Path:
    """An animated GIF of all videos of a run in one grid: `len(row_labels)` rows of `len(col_labels)` videos
    (row-major; missing cells stay blank), row labels on the left, column labels above, a thin bar at the bottom
    showing the time. Every video frame is one GIF frame (the bar keeps identical frames from being merged)."""
    from PIL import Image, ImageDraw

    rows, cols = len(row_labels), len(col_labels)
    if not videos or len(videos) > rows * cols:
        raise ValueError(f"gif_grid: {len(videos)} videos do not fit {rows} rows x {cols} columns")
    tiles, th, tw = _tiles(videos, tile)
    num_frames = tiles[0].shape[0]
    header = header_lines * TEXT_HEIGHT
    width = label_width + PAD + cols * (tw + PAD)
    height = header + PAD + rows * (th + PAD) + 4
    base = Image.new("RGB", (width, height), BACKGROUND)
    draw, font = ImageDraw.Draw(base), _font()
    for c, label in enumerate(col_labels):
        for k, line in enumerate(_wrap(draw, label, tw, font, header_lines)):
            draw.text((label_width + PAD + c * (tw + PAD), 1 + k * TEXT_HEIGHT), line, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels):
        y = header + PAD + r * (th + PAD) + max(0, th // 2 - TEXT_HEIGHT)
        for k, line in enumerate(_wrap(draw, label, label_width - PAD, font, max(1, th // TEXT_HEIGHT))):
            draw.text((PAD, y + k * TEXT_HEIGHT), line, fill=(0, 0, 0), font=font)
    frames = []
    for f in range(num_frames):
        frame = base.copy()
        for i, video in enumerate(tiles):
            r, c = divmod(i, cols)
            frame.paste(Image.fromarray(video[min(f, video.shape[0] - 1)]),
                        (label_width + PAD + c * (tw + PAD), header + PAD + r * (th + PAD)))
        ImageDraw.Draw(frame).rectangle((0, height - 3, round((f + 1) / num_frames * (width - 1)), height - 1),
                                        fill=BORDER)
        frames.append(frame)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
                   disposal=1)
    return path


def write_run_media(folder: str | Path, pairs: Sequence[tuple[str, int]], videos: Sequence[np.ndarray],
                    fps: int = 8, min_side: int = MIN_SIDE, tile: int = 64, sheet_max_videos: int = 64,
                    ) -> dict[str, object]:
    """A run's samples in `folder`: one viewable MP4 per (prompt, seed) (`<slug>_seed<n>.mp4`), `contact_sheet.png`
    (the first `sheet_max_videos` videos, one row each, labelled) and `grid.gif` (one row per prompt, one column per
    seed, in the order of `pairs`). Returns the MP4 names (relative to `folder`), their (height, width) and the two
    picture paths."""
    folder = Path(folder)
    names = video_names(pairs)
    for name, video in zip(names, videos, strict=True):
        write_viewable_mp4(folder / name, video, fps=fps, min_side=min_side)
    labels = [f"{prompt}  (seed {seed})" for prompt, seed in pairs]
    sheet = contact_sheet(folder / "contact_sheet.png", videos[:sheet_max_videos], labels[:sheet_max_videos], tile)
    prompts = list(dict.fromkeys(p for p, _ in pairs))
    seeds = list(dict.fromkeys(s for _, s in pairs))
    if len(pairs) == len(prompts) * len(seeds) and list(pairs) == [(p, s) for p in prompts for s in seeds]:
        grid = gif_grid(folder / "grid.gif", videos, prompts, [f"seed {s}" for s in seeds], fps, tile)
    else:  # not a prompts x seeds product: one labelled row per video
        grid = gif_grid(folder / "grid.gif", videos, labels, [""], fps, tile, label_width=240, header_lines=0)
    size = viewable_size(*videos[0].shape[1:3], min_side)
    return {"videos": names, "size": size, "contact_sheet": sheet, "grid": grid}


def media_options(cfg) -> dict[str, int]:
    """`write_run_media`'s size options from an entry point's `video` config group (defaults where absent)."""
    from omegaconf import OmegaConf

    given = cfg.get("video") or {}
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given)
    return {"min_side": MIN_SIDE, "tile": 64, "sheet_max_videos": 64} | given

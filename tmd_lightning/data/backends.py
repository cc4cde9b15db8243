"""Video decoding backends behind one small interface (docs/method.md §7).

decord is the primary reader. It is unmaintained and, at some small frame sizes, returns frames of the wrong
shape or raises "The size must exactly match"; every decoded clip is therefore checked against the container's
own frame size, and the "auto" backend falls back to PyAV when decord fails or returns a wrong shape.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class VideoDecodeError(RuntimeError):
    """A file that cannot be decoded into the requested clip (missing, corrupt, too short)."""


class VideoBackend(Protocol):
    name: str

    def read(self, path: str | Path, num_frames: int, start: int = 0) -> np.ndarray:
        """Returns `num_frames` consecutive RGB frames from `start` as (F, H, W, 3) uint8."""


def _check_clip(frames: np.ndarray, num_frames: int, hw: tuple[int, int] | None, path: str | Path) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != num_frames:
        raise VideoDecodeError(f"{path}: decoded shape {tuple(frames.shape)}, expected ({num_frames}, H, W, 3)")
    if hw is not None and tuple(frames.shape[1:3]) != tuple(hw):
        raise VideoDecodeError(f"{path}: decoded frame size {tuple(frames.shape[1:3])}, container says {hw}")
    return frames


def _probe_size(path: str | Path) -> tuple[int, int, int]:
    """(num_frames, height, width) from the container via PyAV (cheap: headers only)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return int(stream.frames or 0), int(stream.codec_context.height), int(stream.codec_context.width)
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise VideoDecodeError(f"{path}: cannot open ({exc})") from exc


class PyAVBackend:
    """Decodes with PyAV (FFmpeg); robust at every frame size."""

    name = "pyav"

    def read(self, path: str | Path, num_frames: int, start: int = 0) -> np.ndarray:
        import av

        if not Path(path).is_file():
            raise VideoDecodeError(f"{path}: file not found")
        frames = []
        try:
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i >= start:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == num_frames:
                        break
        except (av.error.FFmpegError, IndexError, OSError) as exc:
            raise VideoDecodeError(f"{path}: cannot decode ({exc})") from exc
        if len(frames) < num_frames:
            raise VideoDecodeError(f"{path}: has {start + len(frames)} frames, need {start + num_frames}")
        return _check_clip(np.stack(frames), num_frames, None, path)


class DecordBackend:
    """Decodes with decord's VideoReader; checks the decoded shape against the container."""

    name = "decord"

    def read(self, path: str | Path, num_frames: int, start: int = 0) -> np.ndarray:
        if not Path(path).is_file():
            raise VideoDecodeError(f"{path}: file not found")
        return self.read_checked(path, num_frames, start, _probe_size(path)[1:])

    def read_checked(self, path: str | Path, num_frames: int, start: int, size: tuple[int, int]) -> np.ndarray:
        """Decodes and checks the clip against a container frame size the caller already probed."""
        import decord

        try:
            reader = decord.VideoReader(str(path), num_threads=1)
            if len(reader) < start + num_frames:
                raise VideoDecodeError(f"{path}: has {len(reader)} frames, need {start + num_frames}")
            frames = reader.get_batch(list(range(start, start + num_frames))).asnumpy()
        except decord.DECORDError as exc:
            raise VideoDecodeError(f"{path}: decord failed ({exc})") from exc
        return _check_clip(frames, num_frames, size, path)


_LOGGED_SIZES: set[tuple[int, int]] = set()  # frame sizes whose decord failure this process has logged


class AutoBackend:
    """decord first; PyAV when decord raises or returns a wrong shape.

    Frame sizes at which decord failed once are remembered and go straight to PyAV (decord's failures are a
    function of the frame size, and each failed attempt costs a full decode). The first failure per size in a
    process is logged at DEBUG: decord 0.6 fails on several small sizes, the toy's 16 px among them; not news.
    """

    name = "auto"

    def __init__(self) -> None:
        self.decord, self.pyav = DecordBackend(), PyAVBackend()
        self.fallbacks = 0
        self.decord_bad_sizes: set[tuple[int, int]] = set()

    def read(self, path: str | Path, num_frames: int, start: int = 0) -> np.ndarray:
        if not Path(path).is_file():
            raise VideoDecodeError(f"{path}: file not found")
        _, height, width = _probe_size(path)
        if (height, width) not in self.decord_bad_sizes:
            try:
                return self.decord.read_checked(path, num_frames, start, (height, width))
            except (VideoDecodeError, ImportError) as exc:
                self.fallbacks += 1
                try:  # a file PyAV cannot read either is bad input, not a decord problem
                    frames = self.pyav.read(path, num_frames, start)
                except VideoDecodeError:
                    raise exc from None
                self.decord_bad_sizes.add((height, width))
                if (height, width) not in _LOGGED_SIZES:
                    _LOGGED_SIZES.add((height, width))
                    log.debug("decord failed on %s (%s); PyAV decodes %dx%d videos", path, exc, height, width)
                return frames
        return self.pyav.read(path, num_frames, start)


def get_backend(name: str) -> VideoBackend:
    """Backend by config name: "decord", "pyav" or "auto"."""
    backends = {"decord": DecordBackend, "pyav": PyAVBackend, "auto": AutoBackend}
    if name not in backends:
        raise ValueError(f"unknown video backend {name!r}; choose one of {sorted(backends)}")
    return backends[name]()

"""Video decoding backends (docs/method.md §7): PyAV, decord, the auto fallback, and clear errors on bad files."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tmd_lightning.data.backends import AutoBackend, DecordBackend, PyAVBackend, VideoDecodeError, get_backend
from tmd_lightning.data.toy_world import ToyVideoSpec, render, write_mp4

SPECS = [
    ToyVideoSpec("red", "circle", "right", size=0.35, travel=0.4, start_x=0.25, start_y=0.5),
    ToyVideoSpec("blue", "triangle", "up", size=0.3, travel=0.35, start_x=0.6, start_y=0.7),
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """{size: [(path, rendered frames), ...]} for 16 and 32 px, plus a 5-frame video."""
    root = tmp_path_factory.mktemp("backends")
    out = {}
    for size in (16, 32):
        out[size] = []
        for i, spec in enumerate(SPECS):
            frames = render(spec, 9, size)
            path = root / f"v{size}_{i}.mp4"
            write_mp4(path, frames)
            out[size].append((path, frames))
    short = root / "short.mp4"
    write_mp4(short, render(SPECS[0], 5, 16))
    out["short"] = short
    return out


def _decord_works_at(path, size) -> bool:
    try:
        return DecordBackend().read(path, 9).shape == (9, size, size, 3)
    except (VideoDecodeError, ImportError):
        return False


@pytest.mark.parametrize("size", [16, 32])
def test_pyav_reads_back_what_was_rendered(videos, size):
    for path, frames in videos[size]:
        decoded = PyAVBackend().read(path, 9)
        assert decoded.shape == (9, size, size, 3)
        assert decoded.dtype == np.uint8
        err = np.abs(decoded.astype(int) - frames.astype(int))
        assert err.mean() < 6, err.mean()
        # a wrong frame order or a shifted clip would show up as a large per-frame error
        assert err.reshape(9, -1).mean(axis=1).max() < 6


@pytest.mark.parametrize("size", [16, 32])
def test_pyav_start_offset(videos, size):
    path, frames = videos[size][0]
    full = PyAVBackend().read(path, 9)
    clip = PyAVBackend().read(path, 4, start=3)
    assert clip.shape == (4, size, size, 3)
    np.testing.assert_array_equal(clip, full[3:7])


def test_decord_matches_pyav_at_32px(videos):
    pytest.importorskip("decord")
    path, frames = videos[32][0]
    if not _decord_works_at(path, 32):
        pytest.skip("this decord build cannot decode 32x32 either")
    for path, frames in videos[32]:
        d, p = DecordBackend().read(path, 9), PyAVBackend().read(path, 9)
        assert d.shape == p.shape == (9, 32, 32, 3)
        assert np.abs(d.astype(int) - p.astype(int)).mean() < 1.0
        assert np.abs(d.astype(int) - frames.astype(int)).mean() < 6
    d, p = DecordBackend().read(path, 4, start=5), PyAVBackend().read(path, 4, start=5)
    assert np.abs(d.astype(int) - p.astype(int)).mean() < 1.0


def test_decord_never_returns_a_wrong_shape_at_16px(videos):
    """decord's known 16 px failure must surface as VideoDecodeError (never as a wrongly shaped array)."""
    pytest.importorskip("decord")
    path, _ = videos[16][0]
    try:
        frames = DecordBackend().read(path, 9)
    except VideoDecodeError:
        return
    assert frames.shape == (9, 16, 16, 3)


@pytest.mark.parametrize("size", [16, 32])
def test_auto_backend_returns_correct_clip(videos, size):
    backend = AutoBackend()
    for path, frames in videos[size]:
        decoded = backend.read(path, 9)
        assert decoded.shape == (9, size, size, 3)
        assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6


def test_auto_backend_records_fallback_at_16px(videos):
    path, _ = videos[16][0]
    backend = AutoBackend()
    backend.read(path, 9)
    if _decord_works_at(path, 16):
        assert backend.fallbacks == 0 and not backend.decord_bad_sizes
        return
    assert backend.fallbacks == 1
    assert (16, 16) in backend.decord_bad_sizes
    # the size is remembered: further 16 px reads go straight to PyAV without another failed decord attempt
    for p, _ in videos[16]:
        assert backend.read(p, 9).shape == (9, 16, 16, 3)
    assert backend.fallbacks == 1


def test_auto_backend_no_fallback_at_32px_when_decord_works(videos):
    path, _ = videos[32][0]
    if not _decord_works_at(path, 32):
        pytest.skip("decord cannot decode 32x32 here")
    backend = AutoBackend()
    backend.read(path, 9)
    assert backend.fallbacks == 0
    assert not backend.decord_bad_sizes


# ---------------------------------------------------------------------------------------------------- bad files

ALL_BACKENDS = [PyAVBackend, DecordBackend, AutoBackend]


@pytest.mark.parametrize("backend_cls", ALL_BACKENDS)
def test_missing_file(tmp_path, backend_cls):
    if backend_cls is DecordBackend:
        pytest.importorskip("decord")
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="not found") as info:
        backend_cls().read(missing, 9)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("backend_cls", ALL_BACKENDS)
@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b""], ids=["random_bytes", "empty"])
def test_unreadable_file(tmp_path, backend_cls, content):
    if backend_cls is DecordBackend:
        pytest.importorskip("decord")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with pytest.raises(VideoDecodeError) as info:
        backend_cls().read(bad, 9)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("backend_cls", ALL_BACKENDS)
@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_truncated_mp4(videos, tmp_path, backend_cls, keep):
    if backend_cls is DecordBackend:
        pytest.importorskip("decord")
    src, _ = videos[16][0]
    raw = src.read_bytes()
    bad = tmp_path / "truncated.mp4"
    bad.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(VideoDecodeError) as info:
        backend_cls().read(bad, 9)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("backend_cls", ALL_BACKENDS)
def test_too_short_video(videos, backend_cls):
    if backend_cls is DecordBackend:
        pytest.importorskip("decord")
    short = videos["short"]
    assert PyAVBackend().read(short, 5).shape == (5, 16, 16, 3)  # the file itself is fine
    with pytest.raises(VideoDecodeError, match="need 9") as info:
        backend_cls().read(short, 9)
    assert str(short) in str(info.value)
    # and with a start offset past what is there
    with pytest.raises(VideoDecodeError):
        backend_cls().read(short, 3, start=3)


@pytest.mark.parametrize("size", [16, 32])
def test_too_short_for_start_offset(videos, size):
    path, _ = videos[size][0]
    for backend in (PyAVBackend(), AutoBackend()):
        with pytest.raises(VideoDecodeError, match="need 10"):
            backend.read(path, 5, start=5)


def test_auto_backend_bad_file_does_not_poison_size(videos, tmp_path):
    """A file that neither backend can read is bad input; it must not mark its size as a decord failure."""
    backend = AutoBackend()
    with pytest.raises(VideoDecodeError):
        backend.read(videos["short"], 9)
    assert (16, 16) not in backend.decord_bad_sizes
    path, frames = videos[16][0]
    assert backend.read(path, 9).shape == (9, 16, 16, 3)


@pytest.mark.parametrize("size", [16, 32])
def test_auto_backend_decodes_with_pyav_when_decord_is_not_installed(videos, size, monkeypatch):
    """decord is a dependency only where it has wheels (manylinux x86_64, Windows amd64); elsewhere `import decord`
    fails and the auto backend must still decode, through PyAV, exactly what PyAV alone decodes."""
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    path, frames = videos[size][0]
    with pytest.raises(ImportError):
        DecordBackend().read(path, 9)
    backend = AutoBackend()
    decoded = backend.read(path, 9)
    np.testing.assert_array_equal(decoded, PyAVBackend().read(path, 9))
    assert decoded.shape == (9, size, size, 3)
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6
    assert (size, size) in backend.decord_bad_sizes  # later reads go straight to PyAV
    assert backend.read(videos[size][1][0], 9).shape == (9, size, size, 3)
    assert backend.fallbacks == 1


# ---------------------------------------------------------------------------------------------------- registry


def test_get_backend_by_name():
    assert isinstance(get_backend("pyav"), PyAVBackend)
    assert isinstance(get_backend("decord"), DecordBackend)
    assert isinstance(get_backend("auto"), AutoBackend)
    assert get_backend("auto") is not get_backend("auto")  # fresh state per call


def test_get_backend_unknown_name():
    with pytest.raises(ValueError, match="nope"):
        get_backend("nope")

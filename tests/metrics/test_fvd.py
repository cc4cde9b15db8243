"""FVD in the StyleGAN-V protocol (docs/method.md §8), each part checked against an independent reference.

No I3D weights exist here: the detector path is exercised with a TorchScript stand-in that has the StyleGAN-V
detector's call signature (``x, rescale, resize, return_features``) and asserts the input contract it is given.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmd_lightning.metrics import (
    FrechetVideoDistance,
    I3DFeatures,
    frechet_distance,
    load_i3d_detector,
    preprocess_i3d,
)

STAND_IN_DIM = 8


class _StandInI3D(nn.Module):
    """Same call signature as StyleGAN-V's ``i3d_torchscript.pt``; checks the (B, 3, 16, 224, 224) [-1, 1] contract."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4 * 4, STAND_IN_DIM)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if rescale:
            x = x.float() / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        if x.dtype != torch.float32 or x.shape[1] != 3 or x.shape[2] != 16 or x.shape[3] != 224 or x.shape[4] != 224:
            raise ValueError("stand-in I3D expects float32 (B, 3, 16, 224, 224)")
        if float(x.min()) < -1.0001 or float(x.max()) > 1.0001:
            raise ValueError("stand-in I3D expects values in [-1, 1]")
        features = self.proj(F.adaptive_avg_pool3d(x, (4, 4, 4)).flatten(1))
        return features if return_features else features.softmax(dim=-1)


@pytest.fixture(scope="module")
def stand_in_path(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    module = _StandInI3D().eval()
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(module).save(str(path))
    return path, module


def _videos(seed: int, shape: tuple[int, ...]) -> Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8))


# ------------------------------------------------------------------------------------------- numpy references


def _sqrtm_fd(mu1, s1, mu2, s2) -> float:
    """Textbook Fréchet distance with scipy matrix square roots of the PSD product sqrt(S1) S2 sqrt(S1)."""
    r1 = np.real(scipy.linalg.sqrtm(s1))
    covmean = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _numpy_fd(real: np.ndarray, fake: np.ndarray) -> float:
    """Single-process FD of two (N, d) feature sets, all at once, float64."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    return _sqrtm_fd(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a half-pixel-centre linear resize without antialiasing (edge-clamped)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        m[i, i0] += 1.0 - (src - i0)
        m[i, i1] += src - i0
    return m


def _reference_preprocess(videos: np.ndarray) -> np.ndarray:
    """uint8 (B, F, H, W, 3) -> float64 (B, 3, 16, 224, 224) in [-1, 1]: first 16 frames, per-frame resize, 2x/255-1."""
    clip = videos[:, :16].astype(np.float64).transpose(0, 4, 1, 2, 3)  # (B, 3, 16, H, W)
    rh, rw = _bilinear_matrix(clip.shape[3], 224), _bilinear_matrix(clip.shape[4], 224)
    return (rh @ clip @ rw.T) * (2.0 / 255.0) - 1.0


def _stand_in_features(module: nn.Module, videos: Tensor) -> np.ndarray:
    x = torch.from_numpy(_reference_preprocess(videos.numpy())).float()
    with torch.no_grad():
        return module(x, rescale=False, resize=False, return_features=True).double().numpy()


# ---------------------------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a, b = rng.standard_normal((dim, dim)), rng.standard_normal((dim, 2 * dim))
    s1, s2 = a @ a.T / dim + 0.1 * np.eye(dim), b @ b.T / (2 * dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) + 0.5
    got = frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_sqrtm_fd(mu1, s1, mu2, s2), rel=1e-8)


# ------------------------------------------------------------------------------------------ metric accumulation


def _mean_pixels(videos: Tensor) -> Tensor:
    """A plain callable extractor: per-frame mean colour, (B, F * 3)."""
    return videos.double().mean(dim=(2, 3)).flatten(1)


def test_metric_in_halves_equals_all_at_once_numpy():
    real, fake = _videos(1, (12, 4, 6, 6, 3)), (_videos(2, (10, 4, 6, 6, 3)) // 2 + 40)
    d = 4 * 3
    expected = _numpy_fd(_mean_pixels(real).numpy(), _mean_pixels(fake).numpy())
    assert expected > 1.0

    # one process, two updates per side
    metric = FrechetVideoDistance(_mean_pixels, num_features=d)
    for part in (real[:5], real[5:]):
        metric.update(part, real=True)
    for part in (fake[:7], fake[7:]):
        metric.update(part, real=False)
    assert (metric.num_real, metric.num_fake) == (12, 10)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-7)

    # two "ranks" merged through their summed states
    a, b = FrechetVideoDistance(_mean_pixels, num_features=d), FrechetVideoDistance(_mean_pixels, num_features=d)
    a.update(real[:5], real=True), a.update(fake[:3], real=False)
    b.update(real[5:], real=True), b.update(fake[3:], real=False)
    a.merge_state(b)
    assert (a.num_real, a.num_fake) == (12, 10)
    assert float(a.compute()) == pytest.approx(expected, rel=1e-7)


def test_metric_states_sum_through_torchmetrics_sync():
    """Emulates a 2-rank gather: each state arrives as [this rank, other rank] and is reduced by the metric."""
    real, fake = _videos(3, (9, 4, 5, 5, 3)), _videos(4, (8, 4, 5, 5, 3))
    other = FrechetVideoDistance(_mean_pixels, num_features=12)
    other.update(real[4:], real=True), other.update(fake[:2], real=False)
    states = {}

    def gather(tensor: Tensor, group=None) -> list[Tensor]:
        name = next(n for n, t in states["this"].metric_state.items() if t is tensor)
        return [tensor, getattr(other, name)]

    this = FrechetVideoDistance(
        _mean_pixels, num_features=12, dist_sync_fn=gather, distributed_available_fn=lambda: True
    )
    states["this"] = this
    this.update(real[:4], real=True), this.update(fake[2:], real=False)
    expected = _numpy_fd(_mean_pixels(real).numpy(), _mean_pixels(fake).numpy())
    assert float(this.compute()) == pytest.approx(expected, rel=1e-7)
    assert (this.num_real, this.num_fake) == (4, 6)  # unsynced again after compute


# ------------------------------------------------------------------------------ a real side kept through reset


class _MeanPixels(nn.Module):
    """`_mean_pixels` as a module, the form torchmetrics' FID takes a custom feature extractor in."""

    num_features = 12

    def forward(self, videos: Tensor) -> Tensor:
        return _mean_pixels(videos)


def _rounds() -> tuple[Tensor, list[Tensor]]:
    """Real videos and two rounds of generated ones (different counts, one shifted)."""
    return _videos(20, (12, 4, 6, 6, 3)), [_videos(21, (9, 4, 6, 6, 3)) // 2 + 40, _videos(22, (7, 4, 6, 6, 3))]


def test_kept_real_side_survives_reset_like_a_recomputation_from_scratch():
    """`reset_real_features=False`: each round after `reset` equals a metric built from scratch on all real videos
    and that round's generated ones (same updates, so bit for bit), and the scipy reference."""
    real, rounds = _rounds()
    kept = FrechetVideoDistance(_mean_pixels, num_features=12, reset_real_features=False)
    kept.update(real[:5], real=True), kept.update(real[5:], real=True)
    for fake in rounds:
        kept.reset()
        assert (kept.num_real, kept.num_fake) == (12, 0)
        kept.update(fake, real=False)
        fresh = FrechetVideoDistance(_mean_pixels, num_features=12)
        fresh.update(real[:5], real=True), fresh.update(real[5:], real=True), fresh.update(fake, real=False)
        assert float(kept.compute()) == float(fresh.compute())
        expected = _numpy_fd(_mean_pixels(real).numpy(), _mean_pixels(fake).numpy())
        assert float(kept.compute()) == pytest.approx(expected, rel=1e-7)


def test_kept_real_side_matches_torchmetrics_fid_option():
    """The same rounds through torchmetrics' FID with its `reset_real_features=False` and the same features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, rounds = _rounds()
    ours = FrechetVideoDistance(_mean_pixels, num_features=12, reset_real_features=False)
    theirs = FrechetInceptionDistance(feature=_MeanPixels(), reset_real_features=False)
    for metric in (ours, theirs):
        metric.update(real, real=True)
    for fake in rounds:
        values = []
        for metric in (ours, theirs):
            metric.reset()
            metric.update(fake, real=False)
            values.append(float(metric.compute()))
        assert values[0] == pytest.approx(values[1], rel=1e-7)


def test_default_reset_clears_both_sides():
    real, (fake, _) = _rounds()
    metric = FrechetVideoDistance(_mean_pixels, num_features=12)
    metric.update(real, real=True), metric.update(fake, real=False)
    metric.reset()
    assert (metric.num_real, metric.num_fake) == (0, 0)
    with pytest.raises(ValueError, match="reset_real_features"):
        FrechetVideoDistance(_mean_pixels, num_features=12, reset_real_features="no")


def test_compute_needs_two_samples_per_side():
    metric = FrechetVideoDistance(_mean_pixels, num_features=12)
    metric.update(_videos(5, (1, 4, 5, 5, 3)), real=True)
    metric.update(_videos(6, (3, 4, 5, 5, 3)), real=False)
    with pytest.raises(RuntimeError, match="at least 2 real samples.*got 1"):
        metric.compute()
    metric.reset()
    metric.update(_videos(5, (2, 4, 5, 5, 3)), real=True)
    with pytest.raises(RuntimeError, match="at least 2 fake samples.*got 0"):
        metric.compute()


def test_wrong_feature_size_and_missing_num_features_raise():
    with pytest.raises(ValueError, match="num_features"):
        FrechetVideoDistance(_mean_pixels)
    metric = FrechetVideoDistance(_mean_pixels, num_features=5)
    with pytest.raises(ValueError, match=r"expected \(2, 5\)"):
        metric.update(_videos(7, (2, 4, 5, 5, 3)), real=True)


# ---------------------------------------------------------------------------------------------- detector path


@pytest.mark.parametrize("shape", [(2, 18, 20, 24, 3), (1, 16, 240, 236, 3)])
def test_preprocess_matches_independent_reference(shape):
    videos = _videos(8, shape)
    x = preprocess_i3d(videos)
    assert x.shape == (shape[0], 3, 16, 224, 224) and x.dtype == torch.float32
    # 1e-4 in [-1, 1] units (< 0.01 grey level) is float32 rounding of torch's source indices; a wrong convention
    # (align_corners=True, nearest) is off by > 0.1
    np.testing.assert_allclose(x.numpy(), _reference_preprocess(videos.numpy()), atol=1e-4, rtol=0)


def test_i3d_features_and_fvd_through_torchscript_stand_in(stand_in_path):
    path, module = stand_in_path
    real = _videos(9, (4, 17, 12, 10, 3))
    shifted = (real.int() + 60).clamp(0, 255).to(torch.uint8)

    extractor = I3DFeatures(path, num_features=STAND_IN_DIM, batch_size=2)
    assert isinstance(extractor.detector, torch.jit.ScriptModule) and not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    feats = extractor(real)
    np.testing.assert_allclose(feats.double().numpy(), _stand_in_features(module, real), rtol=1e-4, atol=1e-5)

    # the literal StyleGAN-V call (uint8 clip, rescale=True, resize=True) agrees with the explicit preprocessing
    literal = I3DFeatures(path, num_features=STAND_IN_DIM, detector_preprocess=True)
    torch.testing.assert_close(literal(real), feats, rtol=1e-4, atol=1e-5)

    metric = FrechetVideoDistance(extractor)
    metric.update(real, real=True)
    metric.update(real, real=False)
    scale = float(np.trace(np.cov(feats.double().numpy(), rowvar=False)))
    assert abs(float(metric.compute())) < 1e-8 * max(scale, 1.0)

    metric.reset()
    metric.update(real, real=True)
    metric.update(shifted, real=False)
    fvd = float(metric.compute())
    expected = _numpy_fd(_stand_in_features(module, real), _stand_in_features(module, shifted))
    assert fvd > 1e-3 * max(scale, 1e-6)
    assert fvd == pytest.approx(expected, rel=1e-3)


def test_extractor_is_not_part_of_the_module_tree(stand_in_path):
    path, _ = stand_in_path
    metric = FrechetVideoDistance(I3DFeatures(path, num_features=STAND_IN_DIM))
    parent = nn.Module()
    parent.fvd = metric
    assert list(metric.children()) == [] and list(parent.parameters()) == []
    assert parent.state_dict() == {}
    assert metric.feature_extractor.num_features == STAND_IN_DIM


def test_missing_detector_file_raises_with_path(tmp_path):
    missing = tmp_path / "nowhere" / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as info:
        load_i3d_detector(missing)
    assert "Nothing is downloaded" in str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "i3d_torchscript.pt"))):
        I3DFeatures(tmp_path)  # a folder without the file


def test_short_videos_raise(stand_in_path):
    path, _ = stand_in_path
    short = _videos(10, (2, 15, 8, 8, 3))
    with pytest.raises(ValueError, match="16 frames, got videos with 15"):
        preprocess_i3d(short)
    metric = FrechetVideoDistance(I3DFeatures(path, num_features=STAND_IN_DIM))
    with pytest.raises(ValueError, match="16 frames"):
        metric.update(short, real=True)
    assert metric.num_real == 0

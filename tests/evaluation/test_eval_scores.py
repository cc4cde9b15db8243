"""Shared scores (`tmd_lightning.evaluation.scores`): FVD against a real reference read once and kept through every
round's reset, checked against a metric rebuilt from scratch and against scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from tmd_lightning.data.manifest import read_manifest, write_manifest
from tmd_lightning.data.toy_world import all_captions, parse_caption, random_spec, render, write_mp4
from tmd_lightning.evaluation import reference_fvd, score_fvd
from tmd_lightning.evaluation.scores import read_videos
from tmd_lightning.metrics.fvd import FrechetVideoDistance, I3DFeatures

FEATURES = 8  # fewer than the real videos, so both covariances have full rank for scipy's square root


class _Detector(nn.Module):
    """Same call signature as StyleGAN-V's I3D TorchScript file: pooled clips through a fixed projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 2 * 4 * 4, FEATURES)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1))


def _scipy_fd(real: np.ndarray, fake: np.ndarray) -> float:
    """Textbook Fréchet distance of two (N, d) feature sets with scipy's matrix square root."""
    mu1, mu2, s1, s2 = real.mean(0), fake.mean(0), np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    r1 = np.real(scipy.linalg.sqrtm(s1))
    covmean = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture
def reference(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in I3D file and a manifest of 20 real toy videos (16 frames, 16 px)."""
    torch.manual_seed(0)
    detector = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_Detector().eval()).save(str(detector))
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(all_captions()[:20]):
        write_mp4(tmp_path / f"{i}.mp4", render(random_spec(rng, **parse_caption(caption)), 16, 16))
        rows.append({"path": f"{i}.mp4", "caption": caption})
    return detector, write_manifest(tmp_path / "real.csv", rows)


def test_reference_fvd_keeps_the_real_side_through_every_round(reference):
    detector, manifest = reference
    metric = reference_fvd(detector, manifest, 16, num_real=18, num_features=FEATURES)  # 18 of 20: 16, then 2
    real = read_videos(read_manifest(manifest)[:18], 16)
    extract = I3DFeatures(detector)
    g = torch.Generator().manual_seed(1)
    for n in (6, 9):  # two evaluation rounds with different generated videos
        fake = torch.randint(0, 256, (n, 16, 16, 16, 3), generator=g, dtype=torch.uint8)
        scores = score_fvd(metric, fake)
        fresh = FrechetVideoDistance(extract, num_features=FEATURES)  # from scratch, the same real updates
        fresh.update(real[:16], real=True), fresh.update(real[16:], real=True), fresh.update(fake, real=False)
        assert scores == {"fvd": float(fresh.compute()), "fvd_num_real": 18, "fvd_num_fake": n}
        expected = _scipy_fd(extract(real).double().numpy(), extract(fake).double().numpy())
        assert scores["fvd"] == pytest.approx(expected, rel=1e-6)


def test_score_fvd_refuses_a_metric_whose_reset_drops_the_real_side(reference):
    detector, _ = reference
    with pytest.raises(ValueError, match="reset_real_features=False"):
        score_fvd(FrechetVideoDistance(I3DFeatures(detector), num_features=FEATURES),
                  torch.zeros(2, 16, 16, 16, 3, dtype=torch.uint8))

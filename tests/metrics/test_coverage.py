"""Mode coverage: start position and size read back from rendered toy videos; the pooled spread vs numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tmd_lightning.data.toy_world import random_spec, render
from tmd_lightning.metrics.coverage import mode_coverage, pooled_within_std, start_and_size


def _videos(specs) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(s, 9, 32) for s in specs]))


def test_start_and_size_match_the_rendered_spec():
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, "red", "square", d) for d in ("left", "right", "up", "down") for _ in range(3)]
    got = start_and_size(_videos(specs)).numpy()
    want = np.array([[s.start_x, s.start_y, s.size] for s in specs])
    np.testing.assert_allclose(got, want, atol=0.02)  # anti-aliased edges at 32 px


def test_pooled_within_std_against_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(11, 3))
    groups = ["a"] * 4 + ["b"] * 5 + ["c"] * 1 + ["d"] * 1
    ss = sum(((values[idx] - values[idx].mean(0)) ** 2).sum(0)
             for idx in (np.arange(0, 4), np.arange(4, 9), np.arange(9, 10), np.arange(10, 11)))
    want = np.sqrt(ss / (11 - 4))
    np.testing.assert_allclose(pooled_within_std(torch.from_numpy(values), groups).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="group labels"):
        pooled_within_std(torch.from_numpy(values), groups[:-1])
    with pytest.raises(ValueError, match="two or more rows"):
        pooled_within_std(torch.from_numpy(values[:2]), ["a", "b"])


def test_coverage_is_one_on_the_data_and_zero_when_collapsed():
    rng = np.random.default_rng(2)
    captions = [(c, d) for c in ("red", "blue") for d in ("left", "up")]
    specs = [random_spec(rng, c, "circle", d) for c, d in captions for _ in range(6)]
    labels = [f"{c} {d}" for c, d in captions for _ in range(6)]
    real = _videos(specs)
    same = mode_coverage(real, labels, real, labels)
    assert same["coverage"] == pytest.approx(1.0) and same["coverage_start_x"] == pytest.approx(1.0)
    collapsed = real[[6 * (i // 6) for i in range(len(specs))]]  # every caption's first video, repeated
    assert mode_coverage(collapsed, labels, real, labels)["coverage"] == pytest.approx(0.0, abs=1e-9)
    half = mode_coverage(real[::2], labels[::2], real, labels)  # a subset of the data: about the data's spread
    assert 0.5 < half["coverage"] < 1.5

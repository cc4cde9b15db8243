"""Fréchet distance between Gaussians, in float64 with an eigenvalue-based trace term (docs/method.md §8)."""

from __future__ import annotations

import torch


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """`|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`.

    The eigenvalues of S1 S2 (a product of PSD matrices) are real and non-negative up to round-off, so
    `tr((S1 S2)^(1/2))` is the sum of their square roots; this avoids an iterative matrix square root.
    """
    mu1, mu2, sigma1, sigma2 = (a.double() for a in (mu1, mu2, sigma1, sigma2))
    eig = torch.linalg.eigvals(sigma1 @ sigma2)
    sqrt_trace = eig.real.clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * sqrt_trace


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    f = features.double()
    mu = f.mean(dim=0)
    d = f - mu
    return mu, d.T @ d / max(f.shape[0] - 1, 1)

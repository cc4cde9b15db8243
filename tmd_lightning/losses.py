"""Pure loss functions (DESIGN.md §4-§5); torch only, so tests can call them directly."""

from __future__ import annotations

import torch


def flow_matching_loss(v_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: mean over elements of `(v_pred - (noise - x))^2`."""
    return (v_pred.float() - (noise - x).float()).pow(2).mean()

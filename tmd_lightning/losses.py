"""Pure loss functions (DESIGN.md §4-§5); torch only, so tests can call them directly."""

from __future__ import annotations

import torch


def flow_matching_loss(v_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: mean over elements of `(v_pred - (noise - x))^2`."""
    return (v_pred.float() - (noise - x).float()).pow(2).mean()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * 4))


def sample_r(s: torch.Tensor, inner_grid: torch.Tensor, p_equal: float,
             uniform: torch.Tensor | None = None) -> torch.Tensor:
    """TM-MF's r (§4 step 3): the largest inner-grid point <= s, then r = s on the rows where `uniform < p_equal`
    (`uniform` ~ U(0, 1) per row, drawn here if not given), a fraction `p_equal` of them."""
    grid = inner_grid.to(s)
    r = grid[torch.searchsorted(grid, s, right=True) - 1]
    uniform = torch.rand_like(s) if uniform is None else uniform
    return torch.where(uniform < p_equal, s, r)


def cfg_target(v: torch.Tensor, u_neg: torch.Tensor, scale: float, guided: torch.Tensor) -> torch.Tensor:
    """`ṽ = ω v + (1 - ω) u(y_s, s, s; c_neg)` on the `guided` rows (not condition-dropped); `v` elsewhere."""
    return torch.where(_rows(guided), scale * v + (1 - scale) * u_neg, v)


def finite_difference_ds(u_fn, sample: torch.Tensor, s: torch.Tensor, velocity: torch.Tensor, delta: float,
                         lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """`d/ds u(y_s, s)` along `dy/ds = velocity` by a central difference, one-sided where s ± δ leaves [lo, hi].

    `u_fn(samples, s)` is called once, on the two stencil points stacked along the batch.
    """
    s_hi = torch.where(s + delta <= hi, s + delta, s)
    s_lo = torch.where(s - delta >= lo, s - delta, s)
    width = s_hi - s_lo
    if bool((width <= 0).any()):
        raise ValueError(f"finite-difference step delta={delta} leaves no room inside [{lo}, {hi}]")
    stencil = torch.cat([sample + _rows(s_hi - s).to(sample) * velocity,
                         sample + _rows(s_lo - s).to(sample) * velocity])
    u_hi, u_lo = u_fn(stencil, torch.cat([s_hi, s_lo])).chunk(2)
    return (u_hi - u_lo) / _rows(width).to(u_hi)


def meanflow_target(v_tilde: torch.Tensor, du_ds: torch.Tensor | None, s: torch.Tensor,
                    r: torch.Tensor) -> torch.Tensor:
    """`û = ṽ - (s - r) du/ds` (the MeanFlow identity); rows with r = s give `ṽ`."""
    if du_ds is None:
        return v_tilde
    return v_tilde - _rows(s - r).to(du_ds) * du_ds


def adaptive_loss(pred: torch.Tensor, target: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean(e / sg(e + c))` with `e = ‖pred - target‖²` per sample (sum over elements); returns (loss, e)."""
    e = (pred.float() - target.float()).pow(2).flatten(1).sum(1)
    return (e / (e.detach() + c)).mean(), e.detach()

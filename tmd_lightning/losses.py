"""Pure loss functions (docs/method.md §4-§5); torch only, so tests can call them directly."""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, or in its own dtype when wider (a float64 run stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def flow_matching_loss(v_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow loss: mean over elements of `(v_pred - (noise - x))^2`, or its `weight`-weighted mean."""
    err = (_wide(v_pred) - _wide(noise - x)).pow(2)
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (weight * err).sum() / weight.sum()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * 4))


def sample_r(s: torch.Tensor, inner_grid: torch.Tensor, p_equal: float,
             uniform: torch.Tensor | None = None) -> torch.Tensor:
    """TM-MF's r (docs/method.md §4, step 3): the largest inner-grid point <= s, then r = s on the rows where
    `uniform < p_equal` (`uniform` ~ U(0, 1) per row, drawn here if not given), a fraction `p_equal` of them."""
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

    `u_fn(samples, s)` is called once, on the two stencil points stacked along the batch. The stencil (times and
    samples) and the difference quotient are formed in float32 (or the inputs' wider dtype) whatever dtype the model
    computes in: ±δ·velocity is one or two bf16 ulps of the sample and s ± δ a few bf16 ulps of s, so rounding
    them to bf16 would replace the step by rounding noise; `u_fn` gets them unrounded and casts where it must.
    """
    wide = torch.promote_types(sample.dtype, torch.float32)
    sample, s, velocity = sample.to(wide), s.to(wide), velocity.to(wide)
    s_hi = torch.where(s + delta <= hi, s + delta, s)
    s_lo = torch.where(s - delta >= lo, s - delta, s)
    width = s_hi - s_lo
    if bool((width <= 0).any()):
        raise ValueError(f"finite-difference step delta={delta} leaves no room inside [{lo}, {hi}]")
    stencil = torch.cat([sample + _rows(s_hi - s) * velocity, sample + _rows(s_lo - s) * velocity])
    u_hi, u_lo = u_fn(stencil, torch.cat([s_hi, s_lo])).to(wide).chunk(2)
    return (u_hi - u_lo) / _rows(width)


def meanflow_target(v_tilde: torch.Tensor, du_ds: torch.Tensor | None, s: torch.Tensor,
                    r: torch.Tensor) -> torch.Tensor:
    """`û = ṽ - (s - r) du/ds` (the MeanFlow identity); rows with r = s give `ṽ`."""
    if du_ds is None:
        return v_tilde
    return v_tilde - _rows(s - r).to(du_ds) * du_ds


def adaptive_loss(pred: torch.Tensor, target: torch.Tensor, c: float,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean(e / sg(e + c))` with `e = ‖pred - target‖²` per sample (sum over elements); returns (loss, e).

    With a per-element `weight` (broadcast to `pred`), e is the weighted sum with the weights rescaled to mean 1 per
    sample, so a weight moves the loss between elements without changing its scale against `c`."""
    err = (_wide(pred) - _wide(target)).pow(2)
    if weight is not None:
        w = weight.to(err).expand_as(err).flatten(1)
        err = err.flatten(1) * w / w.mean(1, keepdim=True)
    e = err.flatten(1).sum(1)
    return (e / (e.detach() + c)).mean(), e.detach()


def vsd_gradient(x_hat: torch.Tensor, g_fake: torch.Tensor, g_real: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """DMD's normalised score difference `(g_fake - g_real) / mean|x̂ - g_real|` per sample, in float32
    (or the inputs' wider dtype).

    Non-finite values are an error, never silently zeroed.
    """
    x_hat, g_fake, g_real = _wide(x_hat), _wide(g_fake), _wide(g_real)
    weight = (x_hat - g_real).abs().flatten(1).mean(1).clamp_min(eps).view(-1, *([1] * (x_hat.dim() - 1)))
    grad = (g_fake - g_real) / weight
    if not torch.isfinite(grad).all():
        raise FloatingPointError("non-finite VSD gradient (g_fake - g_real) / mean|x_hat - g_real|")
    return grad


def vsd_loss(x_hat: torch.Tensor, grad: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """`½ ‖x̂ - sg(x̂ - grad)‖²`, a surrogate whose x̂-gradient is the DMD direction `grad`, scaled.

    "mean" (default) averages over every element, as DMD2's and NVIDIA FastGen's `0.5 * mse(x̂, sg(x̂ - grad))`:
    the x̂-gradient is `grad / numel`, the convention the paper's GAN weight λ = 0.03 refers to. "sum" sums over each
    sample's elements and averages over the batch: the x̂-gradient is `grad / batch`, d times larger (d = elements per
    sample), so the same balance needs λ·d.
    """
    diff = 0.5 * (_wide(x_hat) - (_wide(x_hat) - grad).detach()).pow(2)
    if reduction == "mean":
        return diff.mean()
    if reduction == "sum":
        return diff.flatten(1).sum(1).mean()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def gan_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Non-saturating generator loss `softplus(-D(fake))`, averaged over patches and heads."""
    return torch.stack([torch.nn.functional.softplus(-_wide(lg)).mean() for lg in fake_logits]).mean()


def gan_discriminator_loss(fake_logits: list[torch.Tensor], real_logits: list[torch.Tensor]) -> torch.Tensor:
    """`softplus(D(fake)) + softplus(-D(real))`, averaged over patches and heads."""
    sp = torch.nn.functional.softplus
    return torch.stack([sp(_wide(f)).mean() + sp(-_wide(r)).mean()
                        for f, r in zip(fake_logits, real_logits, strict=True)]).mean()

"""Pure-PyTorch oracle of the exact BatchNorm fold of training (SPEC B §4.3): the test reference of its kernels.

Forward: the batch statistics of the float-weight output `y` (per channel, dim 1: mean, biased variance, σ_B),
then `out = act(res·σ_run/σ_B + β − γ·μ_B/σ_B)` on the quantized-weight output `res`, act a ReLU (clamp_max = inf),
ReLU6 (6) or none. Backward: the closed-form gradients of `out` with respect to `res`, `y` (through μ_B and σ_B), γ
and β; σ_run is a buffer (no gradient). The backward keeps `y` and `out` (not `res`): Σ g·res is recovered as
(Σ g·out − b·Σ g)/a, exact where the activation passes the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_dims(t: Tensor) -> list[int]:
    """Every dimension but the channel one (1)."""
    return [d for d in range(t.dim()) if d != 1]


def per_channel(v: Tensor, ndim: int) -> Tensor:
    """A channel vector shaped to broadcast along dim 1 of an `ndim`-dimensional tensor."""
    return v.reshape([1, -1] + [1] * (ndim - 2))


def activation_mask(out: Tensor, clamp_max: float | None) -> Tensor | None:
    """Where the fused activation passes the gradient (strictly inside its range), or None without one."""
    if clamp_max is None:
        return None
    inside = out > 0
    return inside if clamp_max == float("inf") else inside & (out < clamp_max)


def coefficients(gamma: Tensor, beta: Tensor, std_run: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with out = res·a + b before the activation: a = σ_run/σ_B, b = β − γ·μ_B/σ_B."""
    return std_run / std, beta - gamma * mean / std


def forward(res: Tensor, y: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, eps: float,
            clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, μ_B, unbiased variance for the running statistics, σ_B); statistics in fp32, out in res's dtype."""
    yf = y.float()
    dims = channel_dims(yf)
    m = yf.numel() // yf.shape[1]
    var, mean = torch.var_mean(yf, dims, correction=0)
    std = torch.sqrt(var + eps)
    a, b = coefficients(gamma.float(), beta.float(), std_run.float(), mean, std)
    out = res.float() * per_channel(a, res.dim()) + per_channel(b, res.dim())
    if clamp_max is not None:
        out = out.clamp(0.0, None if clamp_max == float("inf") else clamp_max)
    return out.to(res.dtype), mean, var * (m / max(m - 1, 1)), std


def backward(grad: Tensor, y: Tensor, out: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, mean: Tensor,
             std: Tensor, clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂L/∂res, ∂L/∂y, ∂L/∂γ, ∂L/∂β) for ∂L/∂out = `grad`."""
    g = grad.float()
    mask = activation_mask(out, clamp_max)
    if mask is not None:
        g = torch.where(mask, g, 0.0)
    nd, dims = g.dim(), channel_dims(g)
    m = g.numel() // g.shape[1]
    gamma, beta, std_run = gamma.float(), beta.float(), std_run.float()
    a, b = coefficients(gamma, beta, std_run, mean, std)
    s1 = g.sum(dims)
    s2 = ((g * out.float()).sum(dims) - b * s1) / a  # Σ g·res
    d_mean = -gamma * s1 / std
    d_std = (gamma * mean * s1 - std_run * s2) / std**2
    c1 = d_std / (std * m)  # ∂L/∂y = ∂L/∂μ / m + ∂L/∂σ_B · (y − μ)/(m·σ_B)
    c0 = d_mean / m - c1 * mean
    d_res = g * per_channel(a, nd)
    d_y = y.float() * per_channel(c1, nd) + per_channel(c0, nd)
    return d_res.to(grad.dtype), d_y.to(y.dtype), -s1 * mean / std, s1

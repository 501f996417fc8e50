"""Pure-PyTorch reference of the quantize-and-gate operator: the oracle of every test.

Forward: SPEC Part B §1.4–1.7 and §10.2, in the reference's fp32 operation order, with
straight-through rounding through autograd. Backward: autograd, or the closed form of §10.3
(`closed_form_grads`), which the kernels implement.

`compute_dtype` lets the same formulas run in float64 for the error bound of SPEC A4. `forward` and
`backward` are the reference as a backend kernel: the custom op's default implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ladder import BITS as BITS  # the ladder's constants, also read from here as reference.BITS etc.
from .ladder import LEVEL_C, LEVEL_DIVISORS, SHRINK, level_index

# The x_max whose fp32 grids are finite (≈ 1.6e-27 … 1.1e37, exact in fp32): s_32 stays a normal number and
# 2·x_max does not overflow.
X_MAX_RANGE = (2.0**-89, 2.0**123)


class _RoundSTE(torch.autograd.Function):
    """Round half to even in the forward pass, identity in the backward pass."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(v: Tensor) -> Tensor:
    """Straight-through round (SPEC B §1.10)."""
    return _RoundSTE.apply(v)


def scales(x_max: Tensor, signed: bool) -> list[Tensor]:
    """The five grid steps s_2 … s_32 as successive divisions (SPEC B §1.5)."""
    s = (x_max * 2) / 3 if signed else x_max / 3
    out = [s]
    for d in LEVEL_DIVISORS:
        s = s / d
        out.append(s)
    return out


def clip(x: Tensor, x_max: Tensor, signed: bool) -> Tensor:
    """pact_clip in the reference's exact operation order (SPEC B §1.4)."""
    shrink = torch.tensor(SHRINK, dtype=x_max.dtype, device=x_max.device)
    xm = x_max * shrink
    xmin = -xm if signed else torch.zeros_like(xm)
    span = xm - xmin
    r1 = torch.relu(x - xmin)
    r2 = torch.relu(span - r1)
    return (-r2) + xm


def active_gates(gates: Tensor) -> Tensor:
    """Gates with every gate at and above the first zero one set to 0, gradient included."""
    alive = torch.cumprod((gates > 0).to(gates.dtype), dim=0).detach()
    return gates * alive


def channel_view(g2: Tensor, x: Tensor) -> Tensor:
    """Per-output-channel values ``g2`` shaped to broadcast over ``x`` (channels in dim 0)."""
    return g2.reshape((-1,) + (1,) * (x.dim() - 1))


def _gate_channels(z: Tensor, g2: Tensor | None, x: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """y = g2[c]·z, in x's dtype for the fp32 reference (the float64 oracle stays in float64)."""
    if g2 is not None:
        z = channel_view(g2.to(compute_dtype), z) * z
    return z.to(x.dtype) if compute_dtype == torch.float32 else z


def bb_quantize(
    x: Tensor,
    x_max: Tensor,
    gates: Tensor,
    g2: Tensor | None = None,
    *,
    signed: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gated residual quantization y = g2·(x2 + g4·(x4 + g8·(x8 + g16·(x16 + g32·x32)))).

    `gates` is (g4, g8, g16, g32); the first zero gate ends the chain (SPEC B §1.8). Levels above
    it are computed but enter with a detached zero factor, so forward values are unchanged and no
    host synchronisation is needed. Output has x's dtype.
    """
    xf = x.to(compute_dtype)
    xm = x_max.to(compute_dtype).reshape(())
    xc = clip(xf, xm, signed)
    g = active_gates(gates.to(compute_dtype))
    levels = []
    rho = xc
    for k, s in enumerate(scales(xm, signed)):
        if k:
            rho = rho - levels[-1]
        levels.append(s * round_ste(rho / s))
    z = levels[-1]
    for k in range(len(levels) - 2, -1, -1):
        z = levels[k] + g[k] * z
    return _gate_channels(z, g2, x, compute_dtype)


def fixed_quantize(
    x: Tensor,
    x_max: Tensor,
    bits: int,
    mask: Tensor | None = None,
    *,
    signed: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed-bit PACT quantization y = mask·s_b·R(clip(x)/s_b) (SPEC A3, B §1.11, §6.9)."""
    xf = x.to(compute_dtype)
    xm = x_max.to(compute_dtype).reshape(())
    s = scales(xm, signed)[level_index(bits)]
    z = s * round_ste(clip(xf, xm, signed) / s)
    return _gate_channels(z, mask, x, compute_dtype)


def closed_form_grads(
    grad: Tensor,
    x: Tensor,
    x_max: Tensor,
    gates: Tensor | None,
    g2: Tensor | None,
    *,
    signed: bool,
    bits: int = 0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The straight-through gradients of SPEC B §10.3: (dx, dx_max, d(g4…g32), dg2).

    `bits` = 0 is the gated chain; a bit width selects the fixed-bit single level, for which the
    gate gradient is all zeros. Without g2 the last output is Σ g·z as a length-1 vector.
    """
    cd = compute_dtype
    g = grad.to(cd)
    xf = x.to(cd)
    xm_param = x_max.to(cd).reshape(())
    shrink = torch.tensor(SHRINK, dtype=cd, device=x.device)
    xm = xm_param * shrink
    xmin = -xm if signed else torch.zeros_like(xm)
    xc = clip(xf, xm_param, signed)
    all_s = scales(xm_param, signed)
    if bits:
        first = level_index(bits)
        s_used, c_used, gate_vals = [all_s[first]], [LEVEL_C[first]], torch.zeros(4, dtype=cd, device=x.device)
    else:
        s_used, c_used, gate_vals = all_s, LEVEL_C, active_gates(gates.to(cd))
    n_levels = len(s_used) if bits else 1 + int(torch.count_nonzero(torch.cumprod(gate_vals > 0, 0)))
    C = x.shape[0] if g2 is not None else 1
    G2 = channel_view(g2.to(cd), xf) if g2 is not None else torch.ones((), dtype=cd, device=x.device)

    rho, xs, es = xc, [], []
    for k in range(n_levels):
        if k:
            rho = rho - xs[-1]
        r = rho / s_used[k]
        q = torch.round(r)
        xs.append(s_used[k] * q)
        es.append(q - r)
    us = [xs[-1]]
    for k in range(n_levels - 2, -1, -1):
        us.insert(0, xs[k] + gate_vals[k] * us[0])
    z = us[0]
    Gs = [G2]
    for k in range(n_levels - 1):
        Gs.append(Gs[-1] * gate_vals[k])
    Gs.append(torch.zeros((), dtype=cd, device=x.device))

    inside = ((xf > xmin) & (xf < xm)).to(cd)
    clipsign = (xf >= xm).to(cd) - ((xf <= -xm) & signed).to(cd)
    kappa = 2.0 / 3.0 if signed else 1.0 / 3.0
    dx = g * G2 * inside
    t = g * G2 * shrink * clipsign
    for k in range(n_levels):
        t = t + kappa / c_used[k] * g * es[k] * (Gs[k] - Gs[k + 1])
    dgates = torch.zeros(4, dtype=cd, device=x.device)
    for k in range(n_levels - 1):
        dgates[k] = (g * Gs[k] * us[k + 1]).sum()
    dg2 = (g * z).reshape(C, -1).sum(1)
    return dx, t.sum(), dgates, dg2


def available() -> bool:
    """The reference runs everywhere."""
    return True


def checked_x_max(x_max: Tensor, gates: Tensor | None) -> Tensor:
    """x_max, or NaN when it lies outside X_MAX_RANGE or a gate is not finite: the value check every kernel makes on
    its own (on CPU tensors the op raises first, see validation.check_values)."""
    ok = (x_max >= X_MAX_RANGE[0]) & (x_max <= X_MAX_RANGE[1])
    if gates is not None:
        ok = ok & torch.isfinite(gates).all()
    return torch.where(ok, x_max, torch.nan)


def forward(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int) -> Tensor:
    """The op's forward (bits = 0: the gated chain; else fixed-bit with g2 as the mask)."""
    x_max = checked_x_max(x_max, gates)
    if bits:
        return fixed_quantize(x, x_max, bits, g2, signed=signed)
    return bb_quantize(x, x_max, gates, g2, signed=signed)


def backward(
    grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's backward: the closed form in float64, as (dx in x's dtype, dx_max[1], dgates[4], dg2[C]) fp32."""
    x_max = checked_x_max(x_max, gates)
    dx, dxm, dgates, dg2 = closed_form_grads(grad, x, x_max, gates, g2, signed=signed, bits=bits)
    return dx.to(x.dtype), dxm.reshape(1).float(), dgates.float(), dg2.float()

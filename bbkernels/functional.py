"""The public operator: validate, pick the backend, call the custom op (or the reference)."""

from __future__ import annotations

from torch import Tensor

from . import reference, validation
from .backends import resolve_backend
from .ops import quantize


def bb_quantize(
    x: Tensor,
    x_max: Tensor,
    gates: Tensor,
    g2: Tensor | None = None,
    *,
    signed: bool,
    backend: str | None = None,
) -> Tensor:
    """Bayesian Bits quantize-and-gate: y = g2·(x2 + g4·(x4 + g8·(x8 + g16·(x16 + g32·x32)))).

    Args:
        x: fp32/fp16/bf16 tensor; for weights dim 0 is the output channel.
        x_max: one-element tensor, the learned clip bound (range ±x_max signed, [0, x_max] unsigned).
        gates: (g4, g8, g16, g32) on x's device, sampled or thresholded; the first zero ends the chain.
        g2: optional per-output-channel pruning gate, shape (x.shape[0],).
        signed: symmetric signed grid (True) or unsigned (False).
        backend: `reference`, `cpu`, `triton` or `cuda`; default from $BBKERNELS_BACKEND or the device.

    Returns y with x's shape and dtype; gradients are straight-through (SPEC B §10.3). A NaN in x
    gives NaN in that element of y (and NaN reductions in the x_max, gate and g2 gradients).
    """
    x = validation.check_x(x)
    x_max = validation.check_x_max(x_max, x)
    gates = validation.check_gates(gates, x)
    g2 = validation.check_channel_vector("g2", g2, x)
    signed = validation.check_signed(signed)
    name = resolve_backend(x.device, backend)
    if name == "reference":
        return reference.bb_quantize(x, x_max, gates, g2, signed=signed)
    return quantize(x, x_max, gates, g2, signed, 0, name)


def fixed_quantize(
    x: Tensor,
    x_max: Tensor,
    bits: int,
    mask: Tensor | None = None,
    *,
    signed: bool,
    backend: str | None = None,
) -> Tensor:
    """Fixed-bit quantization y = mask·s_b·round(clip(x)/s_b), a single active level (SPEC A3).

    `mask` is an optional fixed per-output-channel 0/1 vector; other arguments as `bb_quantize`.
    """
    x = validation.check_x(x)
    x_max = validation.check_x_max(x_max, x)
    bits = validation.check_bits(bits)
    mask = validation.check_channel_vector("mask", mask, x)
    signed = validation.check_signed(signed)
    name = resolve_backend(x.device, backend)
    if name == "reference":
        return reference.fixed_quantize(x, x_max, bits, mask, signed=signed)
    return quantize(x, x_max, None, mask, signed, bits, name)

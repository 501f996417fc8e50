"""The public operator: check the arguments' types, pick the backend, call the custom op (or the reference)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference, validation
from .backends import resolve_backend
from .ops import quantize, quantize_on


def _call(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int,
          backend: str | None) -> Tensor:  # fmt: skip
    name = resolve_backend(x.device, backend)
    if name == "reference":  # differentiated by autograd through the reference itself, so checked here
        validation.check_operands(x, x_max, gates, g2, signed, bits)
        validation.check_values(x_max, gates, g2, bits)
        return reference.forward(x, x_max, gates, g2, signed, bits)
    if backend is None:  # the op's per-device registration applies the same policy
        return quantize(x, x_max, gates, g2, signed, bits)
    return quantize_on(x, x_max, gates, g2, signed, bits, name)


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
        x_max: one-element tensor, the learned clip bound (range ±x_max signed, [0, x_max] unsigned), within
            `reference.X_MAX_RANGE`.
        gates: (g4, g8, g16, g32) on x's device, finite, sampled or thresholded; the first zero ends the chain.
        g2: optional per-output-channel pruning gate, shape (x.shape[0],).
        signed: symmetric signed grid (True) or unsigned (False).
        backend: `reference`, `cpu`, `triton` or `cuda`; default from $BBKERNELS_BACKEND or the device.

    Returns y with x's shape and dtype; gradients are straight-through (SPEC B §10.3). A NaN in x
    gives NaN in that element of y (and NaN reductions in the x_max, gate and g2 gradients).
    """
    if not torch.compiler.is_compiling():  # the op checks the rest (traced: its fake implementation)
        validation.check_types(x, x_max, gates, g2, signed, "g2")
    return _call(x, x_max, gates, g2, signed, 0, backend)


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
    if not torch.compiler.is_compiling():
        validation.check_bits(bits)
        validation.check_types(x, x_max, None, mask, signed, "mask")
    return _call(x, x_max, None, mask, signed, bits, backend)

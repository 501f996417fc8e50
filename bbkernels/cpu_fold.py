"""CPU kernels of the exact BatchNorm fold (csrc/bn_fold_cpu.cpp, in the same extension as the operator's); the
reference where the extension cannot be built."""

from __future__ import annotations

from torch import Tensor

from . import fold_reference
from .cpu import EXTENSION


def forward(res: Tensor, y: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, eps: float,
            clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, μ_B, unbiased var, σ_B): statistics in double, one task per channel."""
    module = EXTENSION.load()
    if module is None:
        return fold_reference.forward(res, y, gamma, beta, std_run, eps, clamp_max)
    return tuple(module.fold_forward(res, y, gamma, beta, std_run, eps, clamp_max))


def backward(grad: Tensor, y: Tensor, out: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, mean: Tensor,
             std: Tensor, clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(∂L/∂res, ∂L/∂y, ∂L/∂γ, ∂L/∂β): sums in double, one task per channel."""
    module = EXTENSION.load()
    if module is None:
        return fold_reference.backward(grad, y, out, gamma, beta, std_run, mean, std, clamp_max)
    return tuple(module.fold_backward(grad, y, out, gamma, beta, std_run, mean, std, clamp_max))

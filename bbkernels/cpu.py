"""CPU backend: the vectorised, multi-threaded C++ kernel of csrc/bb_quant_cpu.cpp."""

from __future__ import annotations

from torch import Tensor

from .build import load_extension

# No FMA contraction and no fast-math: the kernel is bit-exact with the reference forward.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")


def _ext():
    return load_extension("bbkernels_cpu", ("bb_quant_cpu.cpp",), CFLAGS)


def available() -> bool:
    """Whether the C++ kernel is built (building it on first call)."""
    return _ext() is not None


def forward(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int) -> Tensor:
    """y of x's shape and dtype."""
    return _ext().forward(x, x_max, gates, g2, signed, bits)


def backward(
    grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dx_max[1], dgates[4], dg2[C]) in one pass over x and grad."""
    return tuple(_ext().backward(grad.to(x.dtype), x, x_max, gates, g2, signed, bits))

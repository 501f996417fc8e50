"""CPU backend: the vectorised, multi-threaded C++ kernel of csrc/bb_quant_cpu.cpp."""

from __future__ import annotations

from .build import ExtensionKernel, load_extension

# No FMA contraction and no fast-math: the kernel is bit-exact with the reference forward.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")

_kernel = ExtensionKernel(lambda: load_extension("bbkernels_cpu", ("bb_quant_cpu.cpp",), CFLAGS))
forward, backward = _kernel.forward, _kernel.backward


def available() -> bool:
    """Whether the C++ kernel is built (building it on first call)."""
    return _kernel.available()

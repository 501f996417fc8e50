"""CPU backend: the vectorised, multi-threaded C++ kernels of csrc/ (bb_quant_cpu.cpp; the BatchNorm fold's,
bn_fold_cpu.cpp, are reached through cpu_fold.py, the deployed quantizer's, qdq_cpu.cpp, through deployed.py), one
extension bound in bb_cpu_bind.cpp."""

from __future__ import annotations

from .build import Extension, ExtensionKernel

# No FMA contraction and no fast-math: the kernel is bit-exact with the reference forward.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")

EXTENSION = Extension("bbkernels_cpu", ("bb_quant_cpu.cpp", "bn_fold_cpu.cpp", "qdq_cpu.cpp", "bb_cpu_bind.cpp"),
                      CFLAGS)
_kernel = ExtensionKernel(EXTENSION)
forward, backward = _kernel.forward, _kernel.backward


def available() -> bool:
    """Whether the C++ kernel is built or can be built here (never builds)."""
    return _kernel.available()

"""CUDA C++ backend: the kernels of csrc/bb_quant_cuda.cu (the same per-element math as the CPU kernel)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from .build import CSRC, Extension, ExtensionKernel

SOURCES = ("bb_quant_cuda.cu", "bb_quant_cuda_bind.cpp")
CFLAGS = ("-O3",)
# Bit-exactness: no FMA contraction, IEEE division, no fast math (SPEC B §10.2).
NVCC_FLAGS = ("-O3", "-fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false")

EXTENSION = Extension("bbkernels_cuda", SOURCES, CFLAGS, NVCC_FLAGS)
_kernel = ExtensionKernel(EXTENSION)
forward, backward = _kernel.forward, _kernel.backward


def available() -> bool:
    """Whether a CUDA device is present and the extension is built or can be built here (never builds)."""
    return torch.cuda.is_available() and _kernel.available()


def cxx_standard() -> str:
    """The C++ standard torch's headers need (C++20 from torch 2.10 on, C++17 before)."""
    aten = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    needs_20 = aten.exists() and "C++20" in aten.read_text()
    return "-std=c++20" if needs_20 else "-std=c++17"


def nvcc_compile_command(nvcc: str, archs: tuple[int, ...], output: str) -> list[str]:
    """An `nvcc -c` command compiling the kernels for each sm_`arch` with the extension's flags (no linking)."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths("cuda"), sysconfig.get_paths()["include"], str(CSRC)]
    return [
        nvcc, "-c", str(CSRC / SOURCES[0]), "-o", output, cxx_standard(), *NVCC_FLAGS,
        *cpp_extension.COMMON_NVCC_FLAGS, *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs),
        "-DTORCH_EXTENSION_NAME=bbkernels_cuda", "-Xcompiler", "-fPIC", *(f"-I{p}" for p in includes),
    ]  # fmt: skip

"""Which kernel runs the operator: names, availability, and the choice in effect (SPEC A5).

The policy, applied per call by the op's CPU and CUDA registrations (ops.py): $BBKERNELS_BACKEND if set, else
the C++ kernel on CPU tensors and Triton, then CUDA C++, on CUDA tensors, each falling back to the reference.
Availability never builds anything: a C++/CUDA kernel is available when built in the cache or buildable here.
"""

from __future__ import annotations

import importlib
import os
from typing import Protocol

import torch
from torch import Tensor

ENV_VAR = "BBKERNELS_BACKEND"
BACKENDS = ("reference", "cpu", "triton", "cuda")
_DEFAULT = {"cpu": "cpu", "cuda": "triton"}
_FALLBACK = {"triton": "cuda"}
_DEVICES = {"cpu": ("cpu",), "triton": ("cuda", "cpu"), "cuda": ("cuda",), "reference": None}
_MODULES = {
    "reference": "bbkernels.reference",
    "cpu": "bbkernels.cpu",
    "triton": "bbkernels.triton_kernels",
    "cuda": "bbkernels.cuda",
}


class Kernel(Protocol):
    """What a backend module provides (tensors already validated, contiguous, fp32 scalars)."""

    def available(self) -> bool:
        ...

    def forward(
        self, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int
    ) -> Tensor: ...

    def backward(
        self,
        grad: Tensor,
        x: Tensor,
        x_max: Tensor,
        gates: Tensor | None,
        g2: Tensor | None,
        signed: bool,
        bits: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


def kernel(name: str) -> Kernel:
    """The backend module implementing `name`."""
    return importlib.import_module(_MODULES[name])


def is_available(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether backend `name` can run on tensors of `device`."""
    if name not in BACKENDS:
        return False
    device_type = torch.device(device).type
    devices = _DEVICES[name]
    if devices is not None and device_type not in devices:
        return False
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    if name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return name == "reference" or kernel(name).available()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """All backends that can run on `device`, default first."""
    return [b for b in BACKENDS if is_available(b, device)]


@torch.compiler.assume_constant_result
def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend in effect for `device`: the argument, else $BBKERNELS_BACKEND, else the default.

    An explicit choice that cannot run raises ValueError. The default degrades: Triton → CUDA C++ →
    reference on GPUs, C++ → reference on CPUs (the C++ loader warns once when it cannot build).
    Never builds a kernel. Under torch.compile it runs once, at trace time.
    """
    device_type = torch.device(device).type
    choice = backend or os.environ.get(ENV_VAR) or None
    if choice is not None:
        if choice not in BACKENDS:
            source = "backend" if backend else ENV_VAR
            raise ValueError(f"{source}={choice!r} is not a backend; choose one of {BACKENDS}")
        if not is_available(choice, device_type):
            raise ValueError(
                f"backend {choice!r} cannot run on {device_type} tensors here; available: "
                f"{available_backends(device_type)} (Triton on CPU needs TRITON_INTERPRET=1)"
            )
        return choice
    name = _DEFAULT.get(device_type)
    while name is not None and not is_available(name, device_type):
        name = _FALLBACK.get(name)
    return name or "reference"

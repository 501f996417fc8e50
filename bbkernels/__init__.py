"""bbkernels: the fused Bayesian Bits quantize-and-gate operator and its backend kernels."""

from . import reference
from .backends import ENV_VAR, available_backends, is_available, resolve_backend
from .functional import bb_quantize, fixed_quantize

__all__ = [
    "ENV_VAR",
    "available_backends",
    "bb_quantize",
    "fixed_quantize",
    "is_available",
    "reference",
    "resolve_backend",
]

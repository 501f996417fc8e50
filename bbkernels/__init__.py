"""bbkernels: the fused Bayesian Bits quantize-and-gate operator, the fused exact BatchNorm fold of training, and
their backend kernels."""

from . import reference
from .backends import ENV_VAR, available_backends, is_available, resolve_backend
from .deployed import Grid, deployed_quantize, grid
from .fold_ops import fold_bn
from .functional import bb_quantize, fixed_quantize

__all__ = [
    "ENV_VAR",
    "Grid",
    "available_backends",
    "bb_quantize",
    "deployed_quantize",
    "fixed_quantize",
    "fold_bn",
    "grid",
    "is_available",
    "reference",
    "resolve_backend",
]

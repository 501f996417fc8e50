"""Argument checks for the public operator: each error names the argument and the fix."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import BITS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, fp16 or bf16), got {value.dtype}")
    return value


def _same_device(name: str, value: Tensor, x: Tensor) -> None:
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; move {name} to {x.device}")


def check_x(x: object) -> Tensor:
    """x: a non-empty fp32/fp16/bf16 tensor."""
    x = _tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}; cast it with x.float()")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); quantize a tensor with at least one element")
    return x


def check_x_max(x_max: object, x: Tensor) -> Tensor:
    """x_max: one positive finite element on x's device.

    The value is checked only where that costs no device synchronisation (CPU tensors); on GPUs a
    non-positive or non-finite x_max makes the kernels return NaN everywhere instead.
    """
    x_max = _tensor("x_max", x_max)
    if x_max.numel() != 1:
        raise ValueError(f"x_max must hold exactly one element, got shape {tuple(x_max.shape)}")
    _same_device("x_max", x_max, x)
    if x_max.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(x_max.detach().reshape(()))
        if not (value > 0 and value < float("inf")):
            raise ValueError(
                f"x_max must be positive and finite, got {value}: run the calibration forward first, or if the "
                "range was learned down to this value, lower its learning rate"
            )
    return x_max


def check_gates(gates: object, x: Tensor) -> Tensor:
    """gates: the four level gates (g4, g8, g16, g32)."""
    gates = _tensor("gates", gates)
    if tuple(gates.shape) != (4,):
        raise ValueError(f"gates must have shape (4,) holding (g4, g8, g16, g32), got {tuple(gates.shape)}")
    _same_device("gates", gates, x)
    return gates


def check_channel_vector(name: str, value: object, x: Tensor) -> Tensor | None:
    """g2 or mask: None, or one value per output channel (dim 0 of x)."""
    if value is None:
        return None
    value = _tensor(name, value)
    if x.dim() == 0 or value.dim() != 1 or value.shape[0] != x.shape[0]:
        want = x.shape[0] if x.dim() else "—"
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per output channel (x.shape[0] = {want}), "
            f"got shape {tuple(value.shape)}"
        )
    _same_device(name, value, x)
    return value


def check_bits(bits: object) -> int:
    """bits: a power of two from 2 to 32."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def check_signed(signed: object) -> bool:
    """signed: a Python bool."""
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    return signed

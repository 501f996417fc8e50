"""The operator's contract, checked by every implementation of the custom ops (the public functions check the
Python types first, and the whole contract on the reference path, which bypasses the ops).

Checks are `torch._check_*` calls (ValueError / TypeError naming the argument and the fix), so they also run on
fake tensors under torch.compile. `check_values` reads x_max and the gates, so only real implementations call it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import BITS, X_MAX_RANGE

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OP_BITS = (0, *BITS)  # 0: the gated chain; else a fixed bit width
VALUE_CHECK = "bbkernels.check_values"  # the profiler range around the eager check on CPU tensors


def _tensor(name: str, value: object, optional: bool = False) -> None:
    torch._check_type(
        isinstance(value, Tensor) or (optional and value is None),
        lambda: f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}",
    )


def _floating(name: str, value: object) -> Tensor:
    _tensor(name, value)
    torch._check_type(
        value.is_floating_point(),
        lambda: f"{name} must be a floating-point tensor (fp32, fp16 or bf16), got {value.dtype}",
    )
    return value


def _same_device(name: str, value: Tensor, x: Tensor) -> None:
    torch._check_value(
        value.device == x.device,
        lambda: f"{name} is on {value.device} but x is on {x.device}; move {name} to {x.device}",
    )


def check_x(x: object) -> Tensor:
    """x: a non-empty fp32/fp16/bf16 tensor."""
    x = _floating("x", x)
    torch._check_type(
        x.dtype in FLOAT_DTYPES, lambda: f"x must be fp32, fp16 or bf16, got {x.dtype}; cast it with x.float()"
    )
    torch._check_value(
        x.numel() > 0, lambda: f"x is empty (shape {tuple(x.shape)}); quantize a tensor with at least one element"
    )
    return x


def check_x_max(x_max: object, x: Tensor) -> Tensor:
    """x_max: one floating-point element on x's device (its value: `check_values`)."""
    x_max = _floating("x_max", x_max)
    torch._check_value(
        x_max.numel() == 1, lambda: f"x_max must hold exactly one element, got shape {tuple(x_max.shape)}"
    )
    _same_device("x_max", x_max, x)
    return x_max


def check_gates(gates: object, x: Tensor, bits: int) -> Tensor | None:
    """gates: the four level gates (g4, g8, g16, g32) of the gated chain (bits = 0); None for a fixed bit width."""
    if bits:
        torch._check_value(gates is None, lambda: f"gates must be None for a fixed bit width (bits = {bits})")
        return None
    torch._check_value(
        gates is not None, lambda: "gates are required for the gated chain (bits = 0): pass (g4, g8, g16, g32)"
    )
    gates = _floating("gates", gates)
    torch._check_value(
        gates.dim() == 1 and gates.shape[0] == 4,
        lambda: f"gates must have shape (4,) holding (g4, g8, g16, g32), got {tuple(gates.shape)}",
    )
    _same_device("gates", gates, x)
    return gates


def check_channel_vector(name: str, value: object, x: Tensor) -> Tensor | None:
    """g2 or mask: None, or one value per output channel (dim 0 of x)."""
    if value is None:
        return None
    value = _floating(name, value)
    torch._check_value(
        x.dim() >= 1 and value.dim() == 1 and value.shape[0] == x.shape[0],
        lambda: f"{name} must be a 1-D tensor with one entry per output channel "
        f"(x.shape[0] = {x.shape[0] if x.dim() else '—'}), got shape {tuple(value.shape)}",
    )
    _same_device(name, value, x)
    return value


def check_bits(bits: object, allowed: tuple[int, ...] = BITS) -> int:
    """bits: one of `allowed` (a power of two from 2 to 32 for fixed-bit quantization)."""
    torch._check_value(
        isinstance(bits, int) and not isinstance(bits, bool) and bits in allowed,
        lambda: f"bits must be one of {allowed}, got {bits!r}",
    )
    return bits


def check_signed(signed: object) -> bool:
    """signed: a Python bool."""
    torch._check_type(isinstance(signed, bool), lambda: f"signed must be a bool, got {type(signed).__name__}")
    return signed


def check_grad(grad: object, x: Tensor) -> Tensor:
    """grad: the output gradient, floating point, x's shape and device."""
    grad = _floating("grad", grad)
    torch._check_value(
        grad.shape == x.shape, lambda: f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}"
    )
    _same_device("grad", grad, x)
    return grad


def check_operands(x: object, x_max: object, gates: object, g2: object, signed: object, bits: object) -> None:
    """Everything but the values of the op's arguments (bits = 0: gated chain, else g2 is the fixed mask)."""
    x = check_x(x)
    check_x_max(x_max, x)
    bits = check_bits(bits, OP_BITS)
    check_gates(gates, x, bits)
    check_channel_vector("mask" if bits else "g2", g2, x)
    check_signed(signed)


def check_types(x: object, x_max: object, gates: object, g2: object, signed: object, channel: str) -> None:
    """The Python types of a public call's arguments, which the op's schema would reject without naming the fix;
    the op checks the rest (`check_operands`). `channel` names g2 in errors."""
    _tensor("x", x)
    _tensor("x_max", x_max)
    _tensor("gates", gates, optional=True)
    _tensor(channel, g2, optional=True)
    check_signed(signed)


def _values_message(x_max: float, gates: list[float] | None, channels: str) -> str:
    low, high = X_MAX_RANGE
    if not low <= x_max <= high:
        return (
            f"x_max must lie in [{low:g}, {high:g}] (outside it the fp32 grid is not finite), got {x_max}: run the "
            "calibration forward first, or if the range was learned to this value, lower its learning rate"
        )
    if not all(map(math.isfinite, gates or ())):
        return f"gates must be finite, got {gates}"
    return f"{channels} must be finite: one of its per-channel values is NaN or infinite"


def check_values(x_max: Tensor, gates: Tensor | None, g2: Tensor | None = None, bits: int = 0) -> None:
    """x_max (as fp32) within reference.X_MAX_RANGE, finite gates and a finite g2 (the mask, for a fixed bit width):
    ValueError on CPU tensors.

    On other devices, and under torch.compile, nothing is read here: every kernel turns an x_max outside the range or
    a non-finite gate into NaN outputs and gradients, and a non-finite channel value gives its channel's outputs
    (no launch, no host synchronisation), which the training loop's finite check reports.
    """
    if x_max.device.type != "cpu" or torch.compiler.is_compiling():
        return
    with torch.profiler.record_function(VALUE_CHECK):  # named, so launch counters can leave this CPU-only work out
        value = x_max.detach().reshape(()).to(torch.float32).item()
        gate_values = None if gates is None else gates.detach().tolist()
        ok = X_MAX_RANGE[0] <= value <= X_MAX_RANGE[1] and all(map(math.isfinite, gate_values or ()))
        ok = ok and (g2 is None or bool(torch.isfinite(g2.detach()).all()))
        torch._check_value(ok, lambda: _values_message(value, gate_values, "mask" if bits else "g2"))

"""The operator as torch.library custom ops, with a kernel registered per device type.

`bbkernels::quantize(x, x_max, gates, g2, signed, bits)` and `bbkernels::quantize_backward(grad, x, …)`;
bits = 0 is the gated chain, 2…32 the fixed-bit single level (g2 is then the fixed mask, gates None).
Registrations, as in bitsandbytes' `_ops.py` + `backends/`:
- the default implementation (any device type): the pure-PyTorch reference;
- CPU and CUDA: the kernel that `backends.resolve_backend` names for the tensors' device at call time
  ($BBKERNELS_BACKEND, else C++ on CPU and Triton → CUDA C++ on CUDA, see backends.py);
- fake (meta) implementations, so torch.compile and CUDA graphs see one opaque op.
Every implementation, fake included, first checks the contract (`validation.check_operands`); the real ones also
check the values (`validation.check_values`: a ValueError for CPU tensors; elsewhere each kernel turns an invalid x_max
or gate into NaN outputs itself, with no launch or host synchronisation of its own).

`bbkernels::quantize_on` / `quantize_backward_on` take a backend name as a last argument: the explicit
`backend=` of the public functions (tests, benchmarks), with the same checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import validation
from .backends import BACKENDS, is_available, kernel, resolve_backend


def _prepare(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None):
    """Kernels take contiguous x and fp32 contiguous scalars, gates and channel vectors."""

    def f32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(torch.float32).contiguous()

    return x.contiguous(), f32(x_max).reshape(1), f32(gates), f32(g2)


def _check_backend(backend: str, x: Tensor) -> None:
    torch._check_value(
        backend in BACKENDS and is_available(backend, x.device),
        lambda: f"backend {backend!r} cannot run on {x.device.type} tensors here; choose one of {BACKENDS}",
    )


def _forward(backend: str, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool,
             bits: int) -> Tensor:  # fmt: skip
    validation.check_operands(x, x_max, gates, g2, signed, bits)
    x, x_max, gates, g2 = _prepare(x, x_max, gates, g2)
    validation.check_values(x_max, gates, g2, bits)
    return kernel(backend).forward(x, x_max, gates, g2, signed, bits)


def _backward(backend: str, grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None,
              signed: bool, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    validation.check_operands(x, x_max, gates, g2, signed, bits)
    validation.check_grad(grad, x)
    x, x_max, gates, g2 = _prepare(x, x_max, gates, g2)
    validation.check_values(x_max, gates, g2, bits)
    return kernel(backend).backward(grad.to(x.dtype).contiguous(), x, x_max, gates, g2, signed, bits)


def _fake_forward(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool,
                  bits: int) -> Tensor:  # fmt: skip
    validation.check_operands(x, x_max, gates, g2, signed, bits)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool,
                   bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    validation.check_operands(x, x_max, gates, g2, signed, bits)
    validation.check_grad(grad, x)
    f32 = dict(dtype=torch.float32, device=x.device)
    channels = g2.shape[0] if g2 is not None else 1
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, torch.empty(1, **f32), torch.empty(4, **f32), torch.empty(channels, **f32)


# --- the per-device op ------------------------------------------------------------------------------


# `signed` is declared optional in the ops' schemas only so that a None reaches the contract, which refuses it: with
# a plain bool the dispatcher would read None as False (an unsigned grid) without a word.
@torch.library.custom_op("bbkernels::quantize", mutates_args=())
def quantize(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool | None,
             bits: int) -> Tensor:  # fmt: skip
    """Quantize-and-gate forward; this body is the default implementation (the reference)."""
    return _forward("reference", x, x_max, gates, g2, signed, bits)


@quantize.register_kernel(("cpu", "cuda"))
def _(x, x_max, gates, g2, signed, bits):
    return _forward(resolve_backend(x.device), x, x_max, gates, g2, signed, bits)


@torch.library.custom_op("bbkernels::quantize_backward", mutates_args=())
def quantize_backward(grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None,
                      signed: bool | None, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Straight-through gradients (dx, dx_max[1], dgates[4], dg2[C]), C = 1 without g2; default: the reference."""
    return _backward("reference", grad, x, x_max, gates, g2, signed, bits)


@quantize_backward.register_kernel(("cpu", "cuda"))
def _(grad, x, x_max, gates, g2, signed, bits):
    return _backward(resolve_backend(x.device), grad, x, x_max, gates, g2, signed, bits)


quantize.register_fake(_fake_forward)
quantize_backward.register_fake(_fake_backward)


# --- the op on a named backend ----------------------------------------------------------------------


@torch.library.custom_op("bbkernels::quantize_on", mutates_args=())
def quantize_on(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool | None, bits: int,
                backend: str) -> Tensor:  # fmt: skip
    """`quantize` on the named backend."""
    _check_backend(backend, x)
    return _forward(backend, x, x_max, gates, g2, signed, bits)


@torch.library.custom_op("bbkernels::quantize_backward_on", mutates_args=())
def quantize_backward_on(grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None,
                         signed: bool | None, bits: int,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`quantize_backward` on the named backend."""
    _check_backend(backend, x)
    return _backward(backend, grad, x, x_max, gates, g2, signed, bits)


@quantize_on.register_fake
def _(x, x_max, gates, g2, signed, bits, backend):
    _check_backend(backend, x)
    return _fake_forward(x, x_max, gates, g2, signed, bits)


@quantize_backward_on.register_fake
def _(grad, x, x_max, gates, g2, signed, bits, backend):
    _check_backend(backend, x)
    return _fake_backward(grad, x, x_max, gates, g2, signed, bits)


# --- autograd ---------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, x_max, gates, g2, *options = inputs  # options: signed, bits[, backend]
    ctx.save_for_backward(x, x_max, gates, g2)
    ctx.options = options


def _autograd(backward_op):
    def grads(ctx, grad: Tensor):
        x, x_max, gates, g2 = ctx.saved_tensors
        dx, dxm, dgates, dg2 = backward_op(grad, x, x_max, gates, g2, *ctx.options)
        return (
            dx,
            dxm.reshape(x_max.shape).to(x_max.dtype),
            None if gates is None else dgates.to(gates.dtype),
            None if g2 is None else dg2.to(g2.dtype),
            *(None for _ in ctx.options),
        )

    return grads


quantize.register_autograd(_autograd(quantize_backward), setup_context=_setup_context)
quantize_on.register_autograd(_autograd(quantize_backward_on), setup_context=_setup_context)

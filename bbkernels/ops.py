"""The operator as torch.library custom ops: schema, fake (meta) implementation and autograd.

`bbkernels::quantize` and `bbkernels::quantize_backward` take the backend name as an argument, so
torch.compile and CUDA graphs see one opaque op per call and the kernel choice is made once, in
Python, before tracing. `bits` = 0 selects the gated chain, 2…32 the fixed-bit single level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import kernel


def _prepare(x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None):
    """Kernels take contiguous x and fp32 contiguous scalars, gates and channel vectors."""

    def f32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(torch.float32).contiguous()

    return x.contiguous(), f32(x_max).reshape(1), f32(gates), f32(g2)


@torch.library.custom_op("bbkernels::quantize", mutates_args=())
def quantize(
    x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool, bits: int, backend: str
) -> Tensor:
    """Quantize-and-gate forward on the chosen backend kernel."""
    return kernel(backend).forward(*_prepare(x, x_max, gates, g2), signed, bits)


@quantize.register_fake
def _(x, x_max, gates, g2, signed, bits, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("bbkernels::quantize_backward", mutates_args=())
def quantize_backward(
    grad: Tensor,
    x: Tensor,
    x_max: Tensor,
    gates: Tensor | None,
    g2: Tensor | None,
    signed: bool,
    bits: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Straight-through gradients (dx, dx_max[1], dgates[4], dg2[C]); C = 1 without g2."""
    x, x_max, gates, g2 = _prepare(x, x_max, gates, g2)
    return kernel(backend).backward(grad.contiguous(), x, x_max, gates, g2, signed, bits)


@quantize_backward.register_fake
def _(grad, x, x_max, gates, g2, signed, bits, backend):
    channels = g2.shape[0] if g2 is not None else 1
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty(1, **f32),
        torch.empty(4, **f32),
        torch.empty(channels, **f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, x_max, gates, g2, signed, bits, backend = inputs
    ctx.save_for_backward(x, x_max, gates, g2)
    ctx.signed, ctx.bits, ctx.backend = signed, bits, backend


def _backward(ctx, grad: Tensor):
    x, x_max, gates, g2 = ctx.saved_tensors
    dx, dxm, dgates, dg2 = quantize_backward(grad, x, x_max, gates, g2, ctx.signed, ctx.bits, ctx.backend)
    return (
        dx,
        dxm.reshape(x_max.shape).to(x_max.dtype),
        None if gates is None else dgates.to(gates.dtype),
        None if g2 is None else dg2.to(g2.dtype),
        None,
        None,
        None,
    )


quantize.register_autograd(_backward, setup_context=_setup_context)

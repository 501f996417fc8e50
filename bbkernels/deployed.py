"""The deployed quantizer: one grid step at the eval bit width, the arithmetic of ONNX QuantizeLinear followed by
DequantizeLinear: y = s_b·clamp(rint(x/s_b), q_lo, q_hi), with x/s_b a true fp32 division and rint half to even.

Evaluation, the ``pruned`` and ``packed`` files and the ONNX graph all compute this; training keeps the residual
chain of `bb_quantize`. The two are equal in exact arithmetic (SPEC B §1.6) and differ in fp32 only where x/s_b lies
within rounding of a half-integer (ARCHITECTURE.md, "One arithmetic for evaluation and deployment").

`bbkernels::qdq` is a custom op so that an exporter sees one node per quantizer (bayesian_bits/export/onnx.py
translates it to Clip→QuantizeLinear→DequantizeLinear), with one kernel per device (C++ on the CPU, Triton on CUDA;
four element-wise ATen ops elsewhere), its gradient straight-through inside the clip range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import cpu
from .backends import is_available
from .ladder import SHRINK, level_index
from .reference import channel_view, scales


@dataclass(frozen=True)
class Grid:
    """The deployed quantizer of one tensor: grid step ``scale`` and clip bounds ``lo``, ``hi`` (all fp32 values)
    at ``bits``; at 32 bits only the clip applies (its grid is finer than fp32 over most of the range)."""

    bits: int
    scale: float
    lo: float
    hi: float

    @property
    def codes(self) -> tuple[int, int]:
        """The lowest and highest integer code (see `codes`)."""
        return codes(self.scale, self.lo, self.hi)


def codes(scale: float, lo: float, hi: float) -> tuple[int, int]:
    """The lowest and highest integer code of step ``scale`` and clip bounds ``lo``, ``hi``: rint(lo/s), rint(hi/s)
    in fp32; ±(2^(b−1)−1) or 0…2^b−1 by design (SPEC B §1.5), but the fp32 rounding of s_b can carry a signed bound
    one code further."""
    bounds = torch.tensor([lo, hi], dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    low, high = torch.round(bounds).tolist()
    return int(low), int(high)


def grid(x_max: float, bits: int, signed: bool) -> Grid:
    """The deployed grid of a quantizer with clip bound ``x_max`` at ``bits``: s_b by the reference's successive fp32
    divisions (SPEC B §1.5), bounds ±x_max·SHRINK or [0, x_max·SHRINK] as pact_clip computes them (§1.4)."""
    xm = torch.tensor(x_max, dtype=torch.float32)
    scale = float(scales(xm, signed)[level_index(bits)])
    hi = float(xm * torch.tensor(SHRINK, dtype=torch.float32))
    return Grid(bits, scale, -hi if signed else 0.0, hi)


def qdq_reference(x: Tensor, scale: float, lo: float, hi: float) -> Tensor:
    """s·rint(clamp(x, lo, hi)/s), computed in fp32 and returned in x's dtype, in four ATen ops: the default
    implementation of `qdq` and the oracle of its one-launch kernels."""
    return torch.clamp(x.float(), lo, hi).div_(scale).round_().mul_(scale).to(x.dtype)


@torch.library.custom_op("bbkernels::qdq", mutates_args=())
def qdq(x: Tensor, scale: float, lo: float, hi: float) -> Tensor:
    """`qdq_reference` as one op; a kernel per device type below."""
    return qdq_reference(x, scale, lo, hi)


@qdq.register_kernel("cpu")
def _(x: Tensor, scale: float, lo: float, hi: float) -> Tensor:
    module = cpu.EXTENSION.load() if cpu.available() else None
    return qdq_reference(x, scale, lo, hi) if module is None else module.qdq(x, scale, lo, hi)


@qdq.register_kernel("cuda")
def _(x: Tensor, scale: float, lo: float, hi: float) -> Tensor:
    if not is_available("triton", x.device):
        return qdq_reference(x, scale, lo, hi)
    from . import triton_kernels

    return triton_kernels.qdq(x, scale, lo, hi)


@qdq.register_fake
def _(x: Tensor, scale: float, lo: float, hi: float) -> Tensor:
    torch._check_type(x.is_floating_point(), lambda: f"x must be a floating-point tensor, got {x.dtype}")
    torch._check_value(scale > 0 and lo <= hi, lambda: f"qdq needs scale > 0 and lo <= hi, got {scale}, {lo}, {hi}")
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, _, lo, hi = inputs
    ctx.save_for_backward(x)
    ctx.bounds = (lo, hi)


def _backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    lo, hi = ctx.bounds
    return grad * ((x >= lo) & (x <= hi)).to(grad.dtype), None, None, None


qdq.register_autograd(_backward, setup_context=_setup_context)


def deployed_quantize(x: Tensor, g: Grid, mask: Tensor | None = None) -> Tensor:
    """``x`` through the deployed quantizer ``g`` (the clip alone at 32 bits), times the per-output-channel 0/1
    ``mask`` (dim 0 of x)."""
    y = torch.clamp(x, g.lo, g.hi) if g.bits == 32 else qdq(x, g.scale, g.lo, g.hi)
    return y if mask is None else y * channel_view(mask.to(y.dtype), x)

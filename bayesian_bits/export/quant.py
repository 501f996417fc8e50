"""What a trained quantizer does in eval mode, as a frozen spec, and the module that replays it exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

import bbkernels
from bbkernels import reference

from ..quantizer import FLOAT_BITS, LEVEL_BITS, BayesianBitsQuantizer, FixedQuantizer


@dataclass(frozen=True)
class QuantSpec:
    """An eval-mode quantizer: 'gated' (Bayesian Bits levels up to ``bits``), 'fixed' (one ``bits`` level) or
    'float' (no quantization, e.g. prune-only weights); ``x_max`` and ``signed`` as learned/calibrated."""

    kind: Literal["gated", "fixed", "float"]
    bits: int
    signed: bool
    x_max: float

    @property
    def scale(self) -> float | None:
        """Grid step s_b = s_2 / c_b (SPEC B §1.5) in fp32, None for float tensors."""
        if self.kind == "float":
            return None
        steps = reference.scales(torch.tensor(self.x_max, dtype=torch.float32), self.signed)
        return float(steps[reference.level_index(self.bits)])


def spec_of(q: nn.Module) -> QuantSpec:
    """The eval-mode behaviour of a Bayesian Bits, fixed or already exported quantizer."""
    if isinstance(q, TensorQuant):
        return q.spec
    x_max, signed = float(q.x_max.detach()), q._signed
    if isinstance(q, BayesianBitsQuantizer):
        if q.fixed_bits:
            return QuantSpec("fixed", q.fixed_bits, signed, x_max)
        if q.prune_only:
            return QuantSpec("float", FLOAT_BITS, signed, x_max)
        return QuantSpec("gated", q.bit_width(), signed, x_max)
    if isinstance(q, FixedQuantizer):
        return QuantSpec("fixed", q._bits, signed, x_max) if q._bits else QuantSpec("float", FLOAT_BITS, signed, x_max)
    raise TypeError(f"not a quantizer: {type(q).__name__}")


class TensorQuant(nn.Module):
    """Replays a ``QuantSpec`` with the same operator and gates as the eval model, so outputs are bit-identical."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("x_max", torch.tensor([spec.x_max], dtype=torch.float32))
        gates = [1.0 if level <= spec.bits else 0.0 for level in LEVEL_BITS]
        self.register_buffer("gates", torch.tensor(gates))

    def extra_repr(self) -> str:
        return f"{self.spec.kind}, bits={self.spec.bits}, signed={self.spec.signed}"

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.kind == "float":
            return x
        if self.spec.kind == "fixed":
            return bbkernels.fixed_quantize(x, self.x_max, self.spec.bits, signed=self.spec.signed)
        return bbkernels.bb_quantize(x, self.x_max, self.gates, signed=self.spec.signed)

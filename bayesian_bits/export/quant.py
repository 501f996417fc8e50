"""What a trained quantizer does in eval mode, as a frozen spec, and the module that replays it exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

import bbkernels

from ..quantizer import BayesianBitsQuantizer, FixedQuantizer, Mode


@dataclass(frozen=True)
class QuantSpec:
    """An eval-mode quantizer: GATED (Bayesian Bits levels up to ``bits``), FIXED (one ``bits`` level) or FLOAT (no
    quantization, ``bits`` None: prune-only weights); ``x_max`` and ``signed`` as learned/calibrated."""

    kind: Mode
    bits: int | None
    signed: bool
    x_max: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Mode(self.kind))
        if self.kind is Mode.FLOAT:  # files written before FLOAT had no bit width stored 32
            object.__setattr__(self, "bits", None)

    @property
    def grid(self) -> bbkernels.Grid | None:
        """The deployed grid (step s_b = s_2 / c_b, SPEC B §1.5, and clip bounds, in fp32), None for float tensors."""
        return None if self.kind is Mode.FLOAT else bbkernels.grid(self.x_max, self.bits, self.signed)

    @property
    def scale(self) -> float | None:
        """Grid step s_b in fp32, None for float tensors."""
        return None if self.kind is Mode.FLOAT else self.grid.scale


def spec_entry(spec: QuantSpec | None) -> dict[str, Any] | None:
    """A spec as plain data for an export file (the mode as its string; None stays None)."""
    return None if spec is None else {"kind": spec.kind.value, "bits": spec.bits, "signed": spec.signed,
                                      "x_max": spec.x_max}


def spec_from_entry(entry: dict[str, Any] | None) -> QuantSpec | None:
    """The spec of a `spec_entry` (None stays None)."""
    return None if entry is None else QuantSpec(**entry)


def spec_of(q: nn.Module) -> QuantSpec:
    """The eval-mode behaviour of a Bayesian Bits, fixed or already exported quantizer."""
    if isinstance(q, TensorQuant):
        return q.spec
    if isinstance(q, (BayesianBitsQuantizer, FixedQuantizer)):
        return QuantSpec(q.mode, q.bit_width(), q.is_signed, float(q.x_max.detach()))
    raise TypeError(f"not a quantizer: {type(q).__name__}")


class TensorQuant(nn.Module):
    """Replays a ``QuantSpec`` with the deployed arithmetic of the eval model (bbkernels/deployed.py), so outputs are
    bit-identical."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.grid = spec.grid

    def extra_repr(self) -> str:
        return f"{self.spec.kind.value}, bits={self.spec.bits}, signed={self.spec.signed}"

    def forward(self, x: Tensor) -> Tensor:
        return x if self.grid is None else bbkernels.deployed_quantize(x, self.grid)

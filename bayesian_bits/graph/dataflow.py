"""What the graph analysis of `prepare` records about a model: its MAC-carrying ops and where their inputs come from.

One description serves MAC assignment, quantizer groups, BOP accounting and export's channel removal (SPEC A8).
Everything is named by module path (`<module>.<op>` for MAC ops other than layers), never by module object, so it
stays valid when quantizers are swapped (`convert_to_fixed`) or the model is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

INPUT_BITS = 8  # the network input has 8-bit colour values (§3.5)
FLOAT_BITS = 32  # what a float tensor (a skipped layer, prune-only weights) counts as in BOPs (A2)


@dataclass(frozen=True)
class Slice:
    """A share of one op input that comes from one source.

    quantizer: module path of the quantizer whose output this slice is; None for an unquantized source, whose
        bit width is `bits` (8 for the network input, None for float tensors).
    fraction: the slice's share of the input's elements (1.0 unless the input is a concatenation).
    mask_from: the layer whose output-channel pruning removes this slice's channels (reached through channel-wise
        ops and depthwise convs only), or None.
    """

    quantizer: str | None
    bits: int | None = INPUT_BITS
    fraction: float = 1.0
    mask_from: str | None = None


@dataclass(frozen=True)
class Term:
    """One MAC-carrying op: a conv/linear layer (`layer`: `name` is its module path), another op over a parameter
    (`weight` = the weight quantizer's path, None when the weight is float) or a product of two activations (`other`
    = the second operand's slices); ops other than layers are named `<module>.<op>` after the module that ran them."""

    name: str
    macs: int
    inputs: tuple[Slice, ...]
    weight: str | None = None
    other: tuple[Slice, ...] = ()
    depthwise: bool = False
    layer: bool = False


@dataclass(frozen=True)
class Region:
    """A layer whose every output path reaches layer inputs through channel-wise ops: its removed output channels
    can be dropped from the depthwise convs in `passthrough` and from the inputs of `sinks` (export)."""

    producer: str
    passthrough: tuple[str, ...] = ()
    sinks: tuple[str, ...] = ()


@dataclass
class Dataflow:
    """The analysis of a prepared model: its MAC-carrying ops in execution order, the layer producing the output
    (`logits`), the removable channel regions, and the batch-1 input shapes (and dtypes) the MACs were counted for."""

    terms: list[Term]
    logits: tuple[str, ...] = ()
    regions: dict[str, Region] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_dtypes: tuple[torch.dtype, ...] = ()

    @property
    def total_macs(self) -> int:
        """MACs of one batch-1 forward over every conv, linear, matmul, einsum and attention product."""
        return sum(t.macs for t in self.terms)


ATTRIBUTE = "bb_dataflow"


def dataflow(model: nn.Module) -> Dataflow:
    """The recorded analysis of a model made by `bayesian_bits.prepare` (unwraps DDP and torch.compile)."""
    found = getattr(unwrap(model), ATTRIBUTE, None)
    if not isinstance(found, Dataflow):
        raise ValueError(
            f"{type(model).__name__} was not prepared for Bayesian Bits (it has no recorded dataflow); "
            "convert it first: model = bayesian_bits.prepare(model, example_inputs)"
        )
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """The prepared module inside DDP / torch.compile wrappers."""
    while not hasattr(model, ATTRIBUTE):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model

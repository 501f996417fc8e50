"""Which pruned channels export removes.

A layer's pruned output channels can be removed physically only if every path from its output reaches the
inputs of other layers through channel-wise operations (activations, quantizers, pooling, flatten); `prepare`
records those layers (`dataflow.Region`). A depthwise conv on such a path passes the removal on (its channel c
reads channel c only). A path into a residual add, the network output or any other operation couples the
channels to other tensors: they stay, with zero weights, and emit their constant in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..graph.dataflow import dataflow, unwrap
from ..layers import QuantLayer
from ..quantizer import BayesianBitsQuantizer, FixedQuantizer
from .quant import TensorQuant

QUANTIZERS = (BayesianBitsQuantizer, FixedQuantizer, TensorQuant)


@dataclass
class Region:
    """A pruned layer whose removed channels flow through ``passthrough`` depthwise convs into ``sinks``."""

    producer: str
    channels: int  # output channels of the producer before removal
    kept: Tensor  # kept output channels of the producer, also of every passthrough
    passthrough: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)


@dataclass
class Regions:
    """The layers in execution order; the region each layer's output channels belong to (producers and
    passthroughs) and the region each layer's input channels belong to (passthroughs and sinks)."""

    order: list[str]
    by_output: dict[str, Region]
    by_input: dict[str, Region]


def regions(model: nn.Module, multiple: int = 1) -> Regions:
    """Every layer of a prepared ``model`` with pruned channels that can be removed, with the layers the removal
    reaches (from the dataflow `prepare` recorded, and the eval masks). With ``multiple`` > 1 each region keeps
    its first pruned channels too, up to a multiple of that many channels (a kept pruned channel emits its constant,
    as in the eval model)."""
    flow, inner = dataflow(model), unwrap(model)
    layers = [t.name for t in flow.terms if t.layer and isinstance(inner.get_submodule(t.name), QuantLayer)]
    found = Regions(layers, {}, {})
    for name, removable in flow.regions.items():
        quantizer = inner.get_submodule(name).weight_quantizer
        mask = None if quantizer is None else quantizer.applied_mask()
        if mask is None:
            continue
        kept = _round_up(mask, multiple)
        if kept.numel() == mask.numel():
            continue
        region = Region(name, mask.numel(), kept, list(removable.passthrough), list(removable.sinks))
        for layer in (region.producer, *region.passthrough):
            found.by_output[layer] = region
        for layer in (*region.passthrough, *region.sinks):
            found.by_input[layer] = region
    return found


def _round_up(mask: Tensor, multiple: int) -> Tensor:
    """The indices of ``mask``'s channels, with its first unmasked ones added up to a multiple of ``multiple``
    (all channels at most), sorted."""
    keep = mask.bool().clone()
    extra = -int(keep.sum()) % multiple
    keep[torch.nonzero(~keep).flatten()[:extra]] = True
    return torch.nonzero(keep).flatten()

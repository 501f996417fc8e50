"""The dataflow graph of a model (torch.fx, layers and quantizers as leaves) and where pruned channels can go.

A layer's pruned output channels can be removed physically only if every path from its output reaches the
inputs of other layers through channel-wise operations (activations, quantizers, pooling, flatten). A
depthwise conv on such a path passes the removal on (its channel c reads channel c only). A path into a
residual add, the network output or any other operation couples the channels to other tensors: they stay,
with zero weights, and emit their constant in place.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..layers import QuantLayer
from ..models.common import check_input
from ..quantizer import BayesianBitsQuantizer, FixedQuantizer
from .layer import ExportLayer, is_depthwise
from .quant import TensorQuant

QUANTIZERS = (BayesianBitsQuantizer, FixedQuantizer, TensorQuant)
LEAVES = (QuantLayer, ExportLayer, *QUANTIZERS)
CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity,
                       *QUANTIZERS)
RELU = (F.relu, torch.relu)
CHANNELWISE_FUNCTIONS = (*RELU, F.relu6)
ADD = (operator.add, torch.add)


class _Tracer(fx.Tracer):
    """Keeps layers and quantizers whole and records the models' input checks as opaque calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(check_input,))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's forward as an fx graph whose call_module nodes are layers, quantizers and torch modules."""
    return _Tracer().trace(model)


def is_input_check(node: fx.Node) -> bool:
    """The models' ``check_input`` call: no dataflow, dropped on export."""
    return node.op == "call_function" and node.target is check_input


def flatten_dims(node: fx.Node) -> tuple[int, int] | None:
    """(start, end) of a ``flatten`` node, or None when the node is not a flatten."""
    if not ((node.op == "call_function" and node.target is torch.flatten) or
            (node.op == "call_method" and node.target == "flatten")):
        return None
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


def _channelwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether channel c of the node's output depends on channel c of its (single) input only."""
    if node.op == "call_module":
        return isinstance(modules[node.target], CHANNELWISE_MODULES)
    if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
        return True
    return flatten_dims(node) == (1, -1)  # channel c becomes a contiguous block of features


@dataclass
class Region:
    """A pruned layer whose removed channels flow through ``passthrough`` depthwise convs into ``sinks``."""

    producer: str
    channels: int  # output channels of the producer before removal
    kept: Tensor  # kept output channels of the producer, also of every passthrough
    passthrough: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)


def layer_order(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[str]:
    """The QuantLayers of the graph in execution order."""
    return [n.target for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QuantLayer)]


@dataclass
class Regions:
    """The layers in execution order; the region each layer's output channels belong to (producers and
    passthroughs) and the region each layer's input channels belong to (passthroughs and sinks)."""

    order: list[str]
    by_output: dict[str, Region]
    by_input: dict[str, Region]


def regions(model: nn.Module) -> Regions:
    """Every layer of ``model`` whose pruned channels can be removed, with the layers the removal reaches."""
    graph, modules = trace(model), dict(model.named_modules())
    found = Regions(layer_order(graph, modules), {}, {})
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, QuantLayer) or layer.weight_quantizer is None or is_depthwise(layer):
            continue
        mask = layer.weight_quantizer.applied_mask()
        if mask is None or bool(mask.all()):
            continue
        region = Region(node.target, mask.numel(), torch.nonzero(mask).flatten())
        if _follow(node, modules, region):
            for name in (region.producer, *region.passthrough):
                found.by_output[name] = region
            for name in (*region.passthrough, *region.sinks):
                found.by_input[name] = region
    return found


def _follow(node: fx.Node, modules: dict[str, nn.Module], region: Region) -> bool:
    """Walk the users of ``node`` and fill the region; False when a path leaves channel-wise territory."""
    frontier = list(node.users)
    while frontier:
        user = frontier.pop()
        target = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(target, QuantLayer):
            if is_depthwise(target) and (target.weight_quantizer is None or
                                         target.weight_quantizer.applied_mask() is None):
                region.passthrough.append(user.target)
                frontier.extend(user.users)
            elif isinstance(target, nn.Linear) or target.groups == 1:
                region.sinks.append(user.target)
            else:
                return False
        elif _channelwise(user, modules):
            frontier.extend(user.users)
        else:
            return False
    return True

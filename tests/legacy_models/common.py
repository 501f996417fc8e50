"""Layer factories, the quantizer topology description and input checks shared by the models."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from bayesian_bits.config import QuantConfig
from bayesian_bits.layers import QuantConv2d, QuantLinear
from bayesian_bits.quantizer import activation_quantizer, weight_quantizer


@dataclass(frozen=True)
class Group:
    """An activation quantizer (module path; None = the 8-bit network input) and the layers it feeds (§3.2)."""

    act: str | None
    layers: tuple[str, ...]


@dataclass
class Topology:
    """How quantizers and layers connect, for MAC assignment and BOP counting (§3.2, §3.5).

    groups: the quantizer groups; quantizers in no group (pre-add tensors) are left out of BOPs.
    input_from: layer → the layer whose pruning mask removes its input channels.
    """

    groups: list[Group] = field(default_factory=list)
    input_from: dict[str, str] = field(default_factory=dict)


def conv(
    config: QuantConfig | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    groups: int = 1,
    bias: bool = False,
    batch_norm: bool = True,
    activation: nn.Module | None = None,
    prune: bool = True,
) -> QuantConv2d:
    """A conv layer with the quantizers `config` asks for (none when config is None: the float twin)."""
    return QuantConv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding,
        groups=groups,
        bias=bias and not batch_norm,
        bn=nn.BatchNorm2d(out_channels) if batch_norm else None,
        activation=activation,
        weight_quantizer=None if config is None else weight_quantizer(config, out_channels, prune=prune),
        act_quantizer=None if config is None else activation_quantizer(config),
    )


def linear(
    config: QuantConfig | None,
    in_features: int,
    out_features: int,
    *,
    bias: bool = True,
    batch_norm: bool = False,
    activation: nn.Module | None = None,
    logits: bool = False,
) -> QuantLinear:
    """A linear layer; `logits=True`: not pruned and no output quantizer (full-precision logits, §4.2)."""
    return QuantLinear(
        in_features,
        out_features,
        bias=bias and not batch_norm,
        bn=nn.BatchNorm1d(out_features) if batch_norm else None,
        activation=activation,
        weight_quantizer=None if config is None else weight_quantizer(config, out_features, prune=not logits),
        act_quantizer=None if (config is None or logits) else activation_quantizer(config),
    )


def sequential_topology(layer_names: list[str]) -> Topology:
    """LeNet/VGG: each layer is fed by the previous layer's output quantizer and sees its pruning (§3.5)."""
    topo = Topology()
    for i, name in enumerate(layer_names):
        prev = layer_names[i - 1] if i else None
        topo.groups.append(Group(None if prev is None else f"{prev}.act_quantizer", (name,)))
        if prev is not None:
            topo.input_from[name] = prev
    return topo


def check_input(x: Tensor, model: str, channels: int, size: tuple[int, int] | None = None) -> None:
    """Raise ValueError naming the expected shape when `x` is not an N×C×H×W batch the model accepts."""
    want = f"N×{channels}×{size[0]}×{size[1]}" if size else f"N×{channels}×H×W"
    if not isinstance(x, Tensor):
        raise TypeError(f"{model} expects a tensor of shape {want}, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels or (size is not None and tuple(x.shape[2:]) != size):
        raise ValueError(f"{model} expects input of shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{model} expects a floating-point input, got {x.dtype}; cast it with .float()")

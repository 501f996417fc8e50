"""The ``pruned`` format: a float eval model with pruned output channels physically removed (SPEC A7).

Each conv/linear becomes an ``ExportLayer``: BN folded, the weight fake-quantized once at its eval bit width,
pruned output channels and the matching input channels of the next layer dropped. A pruned channel still emits
a constant (its folded bias through the activation and output quantizer); that constant's contribution is
carried into the next layer: into its bias for linear layers and unpadded convs, and as a per-position bias
map for zero-padded convs (where border positions see less of it), so the result equals the masked model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import bn_fold
from ..layers import QuantLayer
from ..pipeline.errors import UsageError
from .loader import Loaded
from .quant import QuantSpec, TensorQuant, spec_of

SEQUENTIAL_MODELS = ("lenet5quantized", "vggquantized")


@dataclass
class LayerSpec:
    """One exported layer: its pruned float weight and bias, optional bias map, and its quantizers."""

    name: str
    weight: Tensor
    bias: Tensor
    bias_map: Tensor | None
    weight_quant: QuantSpec | None
    act_quant: QuantSpec | None
    kept: Tensor  # indices of kept output channels in the original layer


class ExportLayer(nn.Module):
    """Plain conv/linear with the eval weight, plus optional bias map, activation and output quantizer."""

    def __init__(self, op: nn.Conv2d | nn.Linear, bias_map: Tensor | None, activation: nn.Module | None,
                 act_quant: QuantSpec | None) -> None:
        super().__init__()
        self.op = op
        self.register_buffer("bias_map", bias_map)
        self.activation = activation
        self.act_quant = None if act_quant is None else TensorQuant(act_quant)

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(x)
        if self.bias_map is not None:
            y = y + self.bias_map
        if self.activation is not None:
            y = self.activation(y)
        return y if self.act_quant is None else self.act_quant(y)


def check_sequential(name: str) -> None:
    """Refuse models whose layers do not form one chain (residual adds, depthwise convs)."""
    if name not in SEQUENTIAL_MODELS:
        raise UsageError(f"export of pruned channels supports {' and '.join(SEQUENTIAL_MODELS)}, not {name}; "
                         "use --format manifest for it")


def layer_names(model: nn.Module) -> list[str]:
    """The conv/linear layers in forward order (sequential topology)."""
    return [n for group in model.topology().groups for n in group.layers]


@torch.no_grad()
def eval_weight(layer: QuantLayer) -> tuple[Tensor, Tensor]:
    """The layer's eval weight (BN-folded, fake-quantized, pruned rows zero) and bias (folded BN bias or own)."""
    bn, quantize = layer.bn, layer.weight_quantizer
    weight = layer.weight if bn is None else bn_fold.fold_weight(layer.weight, bn)
    if quantize is not None:
        weight = quantize(weight)
    if bn is not None:
        bias = bn_fold.folded_bias(bn)
    else:
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
    return weight.detach().clone(), bias.detach().clone()


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Each layer's input for one random batch-1 forward of the eval model."""
    seen: dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
    try:
        model(torch.rand(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _zero_padded(layer: nn.Module) -> bool:
    """Whether border outputs of the layer see zero padding (then a constant input gives a non-constant map)."""
    return isinstance(layer, nn.Conv2d) and any(p != 0 for p in layer.padding)


def _channels(x: Tensor, channels: int) -> Tensor:
    """View a batch-1 input as (1, channels, rest): conv feature maps or flattened maps feeding a linear layer."""
    return x.reshape(1, channels, -1)


@torch.no_grad()
def layer_specs(loaded: Loaded) -> list[LayerSpec]:
    """Pruned float layers of a sequential eval model, with the constants of pruned channels carried forward."""
    check_sequential(loaded.name)
    model, names = loaded.model, layer_names(loaded.model)
    inputs = layer_inputs(model, names, loaded.input_shape)
    specs: list[LayerSpec] = []
    prev_kept: Tensor | None = None
    prev_channels = 0
    for name in names:
        layer = model.get_submodule(name)
        weight, bias = eval_weight(layer)
        mask = None if layer.weight_quantizer is None else layer.weight_quantizer.keep_mask()
        kept = torch.arange(weight.shape[0]) if mask is None else torch.nonzero(mask).flatten()
        if kept.numel() == 0:
            raise UsageError(f"layer {name} has every output channel pruned; the network's output is constant")
        bias_map = None
        if prev_kept is not None:
            x = _channels(inputs[name], prev_channels).clone()
            x[:, prev_kept] = 0  # what remains: the constants that pruned channels emit
            constant = layer._op(x.reshape(inputs[name].shape), weight, None)[0]
            if not _zero_padded(layer):
                bias = bias + constant.reshape(constant.shape[0], -1)[:, 0]
            else:
                bias_map = constant + bias.reshape(-1, 1, 1)
                bias = torch.zeros_like(bias)
            per_channel = weight.reshape(weight.shape[0], prev_channels, -1)[:, prev_kept]
            weight = per_channel.reshape(weight.shape[0], -1, *weight.shape[2:])
        specs.append(LayerSpec(name, weight[kept].contiguous(), bias[kept].contiguous(),
                               None if bias_map is None else bias_map[kept].contiguous(),
                               None if layer.weight_quantizer is None else spec_of(layer.weight_quantizer),
                               None if layer.act_quantizer is None else spec_of(layer.act_quantizer), kept))
        prev_kept, prev_channels = kept, layer.weight.shape[0]
    return specs


def plain_op(layer: QuantLayer, weight: Tensor, bias: Tensor) -> nn.Conv2d | nn.Linear:
    """A torch conv/linear shaped like ``weight`` with ``layer``'s geometry, holding ``weight`` and ``bias``."""
    if isinstance(layer, nn.Conv2d):
        op: nn.Conv2d | nn.Linear = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride,
                                              layer.padding, layer.dilation)
    else:
        op = nn.Linear(weight.shape[1], weight.shape[0])
    op.weight = nn.Parameter(weight, requires_grad=False)
    op.bias = nn.Parameter(bias, requires_grad=False)
    return op


def assemble(skeleton: nn.Module, specs: list[LayerSpec]) -> nn.Module:
    """A copy of ``skeleton`` (the quantized model, for its structure) with every layer replaced by its
    ``ExportLayer``; eval mode, no gradients."""
    model = copy.deepcopy(skeleton)
    for spec in specs:
        layer = model.get_submodule(spec.name)
        parent, _, attr = spec.name.rpartition(".")
        new = ExportLayer(plain_op(layer, spec.weight, spec.bias), spec.bias_map, layer.activation, spec.act_quant)
        setattr(model.get_submodule(parent), attr, new)
    return model.eval().requires_grad_(False)


def pruned_model(loaded: Loaded) -> nn.Module:
    """The pruned float model of a sequential eval model (LeNet5, VGG7)."""
    return assemble(loaded.model, layer_specs(loaded))


def export_pruned(loaded: Loaded, out: str | Path) -> str:
    """Save the pruned model with ``torch.save`` (load with ``torch.load(out, weights_only=False)``)."""
    model = pruned_model(loaded)
    torch.save(model, out)
    return f"wrote {out}: pruned float model, {layer_parameters(model):,} parameters " \
           f"(unpruned eval model {layer_parameters(loaded.model):,})"


def layer_parameters(model: nn.Module) -> int:
    """Weights and biases of the conv/linear layers as deployed (folded BN counts as a bias; quantizer and
    gate parameters are not counted)."""
    layers = [m.op if isinstance(m, ExportLayer) else m for m in model.modules()
              if isinstance(m, (ExportLayer, QuantLayer))]
    return sum(m.weight.numel() + m.weight.shape[0] for m in layers)

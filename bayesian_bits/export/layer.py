"""The deployed form of one quantized conv/linear layer: a plain torch op holding the eval weight, an optional
per-position bias map, the nonlinearity and the output quantizer."""

from __future__ import annotations

from torch import Tensor, nn

from ..graph.placement import is_depthwise
from ..layers import QuantLayer
from .quant import QuantSpec, TensorQuant


class ExportLayer(nn.Module):
    """Plain conv/linear with the eval weight, plus optional bias map, activation and output quantizer;
    ``weight_quant`` records the quantizer the weight went through (for the integer formats)."""

    def __init__(self, op: nn.Conv2d | nn.Linear, bias_map: Tensor | None, activation: nn.Module | None,
                 act_quant: QuantSpec | None, weight_quant: QuantSpec | None) -> None:
        super().__init__()
        self.op = op
        self.weight_quant = weight_quant
        self.register_buffer("bias_map", bias_map)
        self.activation = activation
        self.act_quant = None if act_quant is None else TensorQuant(act_quant)

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(x)
        if self.bias_map is not None:
            if y.shape[1:] != self.bias_map.shape:
                raise ValueError(f"this layer was exported for outputs of shape {tuple(self.bias_map.shape)} "
                                 f"(the export's input size), got {tuple(y.shape[1:])}; export again with "
                                 "--image-size set to the input size you deploy")
            y = y + self.bias_map
        if self.activation is not None:
            y = self.activation(y)
        return y if self.act_quant is None else self.act_quant(y)


def plain_op(layer: QuantLayer, weight: Tensor, bias: Tensor) -> nn.Conv1d | nn.Conv2d | nn.Linear:
    """A torch conv/linear shaped like ``weight`` with ``layer``'s geometry, holding ``weight`` and ``bias``."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        conv = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        # A depthwise conv loses the groups of removed channels; other convs keep their groups.
        groups = weight.shape[0] * layer.in_channels // layer.out_channels if is_depthwise(layer) else layer.groups
        op: nn.Module = conv(weight.shape[1] * groups, weight.shape[0], layer.kernel_size, layer.stride,
                             layer.padding, layer.dilation, groups, padding_mode=layer.padding_mode)
    else:
        op = nn.Linear(weight.shape[1], weight.shape[0])
    op.weight = nn.Parameter(weight, requires_grad=False)
    op.bias = nn.Parameter(bias, requires_grad=False)
    return op

"""Quantized conv and linear layers: weight quantizer, optional folded BN, nonlinearity, output quantizer (§4.1–4.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bn_fold


class QuantLayer(nn.Module):
    """Mixin for a conv or linear layer (listed before the torch class).

    forward: weight → weight quantizer (on the BN-folded weight when there is BN) → conv/linear →
    BN (folded: batch statistics in training unless frozen, running statistics otherwise) →
    activation → output quantizer. Without a weight quantizer BN runs unfolded, so the same class
    gives the float twin of a model.
    """

    bn: nn.Module | None
    activation: nn.Module | None
    weight_quantizer: nn.Module | None
    act_quantizer: nn.Module | None

    def __init__(
        self,
        *args,
        bn: nn.Module | None = None,
        activation: nn.Module | None = None,
        weight_quantizer: nn.Module | None = None,
        act_quantizer: nn.Module | None = None,
        **kwargs,
    ) -> None:
        """The torch layer's own arguments, then the folded BN, the nonlinearity and the two quantizers."""
        super().__init__(*args, **kwargs)
        self.bn = bn
        self.activation = activation
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.bn_frozen = False

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's conv or linear with the given weight and bias (no BN, activation or quantizer)."""
        raise NotImplementedError

    def freeze_bn(self) -> None:
        """Use the running statistics from now on, also in training; γ and β keep learning (--static-fold-bn)."""
        self.bn_frozen = True

    def forward(self, x: Tensor) -> Tensor:
        quantize, bn, act = self.weight_quantizer, self.bn, self.activation
        if bn is None:
            y = self.op(x, self.weight if quantize is None else quantize(self.weight), self.bias)
        elif quantize is None:
            y = bn(self.op(x, self.weight, None))
        else:
            weight = quantize(bn_fold.fold_weight(self.weight, bn))
            if self.training and not self.bn_frozen:
                # A second, float-weight pass gives the batch statistics (§4.3).
                fused = act if type(act) in bn_fold.FUSED_CLAMPS else None
                y = bn_fold.fold_train(self.op(x, weight, None), self.op(x, self.weight, None), bn, fused)
                act = None if fused is not None else act
            else:
                y = self.op(x, weight, bn_fold.folded_bias(bn))
        if act is not None:
            y = act(y)
        if self.act_quantizer is not None:
            y = self.act_quantizer(y)
        return y


class QuantConv1d(QuantLayer, nn.Conv1d):
    """Conv1d (any groups, dilation, padding mode) with optional folded BN, activation and quantizers."""

    op = nn.Conv1d._conv_forward


class QuantConv2d(QuantLayer, nn.Conv2d):
    """Conv2d (any groups, dilation, padding mode) with optional folded BN, activation and quantizers."""

    op = nn.Conv2d._conv_forward


class QuantLinear(QuantLayer, nn.Linear):
    """Linear (any leading dimensions) with optional folded BN1d, activation and quantizers."""

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
}


def quant_layer(
    layer: nn.Conv1d | nn.Conv2d | nn.Linear,
    *,
    bn: nn.Module | None = None,
    activation: nn.Module | None = None,
    weight_quantizer: nn.Module | None = None,
    act_quantizer: nn.Module | None = None,
) -> QuantLayer:
    """The quantized twin of a float conv/linear layer, holding its weight and bias parameters (a conv bias in
    front of `bn` is absorbed into the running mean, as the reference does, §4.4)."""
    cls = next(q for t, q in QUANT_LAYERS.items() if isinstance(layer, t))
    if isinstance(layer, nn.Linear):
        args, kwargs = (layer.in_features, layer.out_features), {}
    else:
        args = (layer.in_channels, layer.out_channels, layer.kernel_size)
        kwargs = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                  "groups": layer.groups, "padding_mode": layer.padding_mode}
    keep_bias = layer.bias is not None and bn is None
    out = cls(*args, bias=keep_bias, device="meta", bn=bn, activation=activation,
              weight_quantizer=weight_quantizer, act_quantizer=act_quantizer, **kwargs)
    out.weight = layer.weight
    if keep_bias:
        out.bias = layer.bias
    elif layer.bias is not None:
        with torch.no_grad():
            bn.running_mean.sub_(layer.bias)
    return out

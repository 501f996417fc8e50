"""Quantized conv and linear layers: weight quantizer, optional folded BN, nonlinearity, output quantizer (§4.1–4.3)."""

from __future__ import annotations

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

    def _attach(
        self,
        bn: nn.Module | None,
        activation: nn.Module | None,
        weight_quantizer: nn.Module | None,
        act_quantizer: nn.Module | None,
    ) -> None:
        self.bn = bn
        self.activation = activation
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.bn_frozen = False

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def freeze_bn(self) -> None:
        """Use the running statistics from now on, also in training; γ and β keep learning (--static-fold-bn)."""
        self.bn_frozen = True

    def forward(self, x: Tensor) -> Tensor:
        quantize, bn, act = self.weight_quantizer, self.bn, self.activation
        if bn is None:
            y = self._op(x, self.weight if quantize is None else quantize(self.weight), self.bias)
        elif quantize is None:
            y = bn(self._op(x, self.weight, None))
        else:
            weight = quantize(bn_fold.fold_weight(self.weight, bn))
            if self.training and not self.bn_frozen:
                # A second, float-weight pass gives the batch statistics (§4.3).
                fused = act if type(act) in bn_fold.FUSED_CLAMPS else None
                y = bn_fold.fold_train(self._op(x, weight, None), self._op(x, self.weight, None), bn, fused)
                act = None if fused is not None else act
            else:
                y = self._op(x, weight, bn_fold.folded_bias(bn))
        if act is not None:
            y = act(y)
        if self.act_quantizer is not None:
            y = self.act_quantizer(y)
        return y


class QuantConv2d(QuantLayer, nn.Conv2d):
    """Conv2d with optional BN (bias then dropped), activation, weight and output quantizers."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        *,
        batch_norm: bool = False,
        activation: nn.Module | None = None,
        weight_quantizer: nn.Module | None = None,
        act_quantizer: nn.Module | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias and not batch_norm
        )
        self._attach(nn.BatchNorm2d(out_channels) if batch_norm else None, activation, weight_quantizer, act_quantizer)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantLayer, nn.Linear):
    """Linear with optional BN1d (bias then dropped), activation, weight and output quantizers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        batch_norm: bool = False,
        activation: nn.Module | None = None,
        weight_quantizer: nn.Module | None = None,
        act_quantizer: nn.Module | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias and not batch_norm)
        self._attach(nn.BatchNorm1d(out_features) if batch_norm else None, activation, weight_quantizer, act_quantizer)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

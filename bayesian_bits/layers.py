"""Quantized conv and linear layers: weight quantizer, optional folded BN, nonlinearity, output quantizer (§4.1–4.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bn_fold
from .bn_fold import per_channel
from .fold_bank import FoldBank, FoldValues, layer_fold_values

BN_FOLDS = ("exact", "fast")


class QuantLayer(nn.Module):
    """Mixin for a conv or linear layer (listed before the torch class).

    forward: weight → weight quantizer (on the BN-folded weight when there is BN) → conv/linear → BN (folded:
    batch statistics in training unless frozen, running statistics otherwise) → activation → output quantizer.
    Without a weight quantizer BN runs unfolded, so the same class gives the float twin of a model.

    `bn_fold` chooses the training fold (A13): 'exact' (SPEC B §4.3: the quantized-weight conv rescaled by the batch
    statistics of a second, float-weight conv) or 'fast' (one conv: the quantized folded weight taken back to the
    unfolded scale, then BatchNorm on that output's batch statistics). Eval and frozen BN are the same for both:
    conv(x, Q(W·γ/σ_run)) + β − γ·μ_run/σ_run. The fold's per-channel values come from the model's `FoldBank`.
    In eval without autograd the quantized weight and bias are kept until a parameter or buffer they come from
    changes.
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
        bn_fold: str = "exact",
        **kwargs,
    ) -> None:
        """The torch layer's own arguments, then the folded BN, the nonlinearity, the two quantizers and the fold."""
        super().__init__(*args, **kwargs)
        if bn_fold not in BN_FOLDS:
            raise ValueError(f"bn_fold must be one of {BN_FOLDS}, got {bn_fold!r}")
        self.bn = bn
        self.activation = activation
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.bn_fold = bn_fold
        self.bn_frozen = False
        self.fold_row = 0
        self.gates_carry_fold = False  # the fast fold's inverse scale is in the gate bank's pruning gates (prepare)
        self._eval_cache: tuple[tuple, tuple[Tensor, Tensor | None]] | None = None

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's conv or linear with the given weight and bias (no BN, activation or quantizer)."""
        raise NotImplementedError

    def freeze_bn(self) -> None:
        """Use the running statistics from now on, also in training; γ and β keep learning (--static-fold-bn)."""
        self.bn_frozen = True

    @property
    def folds(self) -> bool:
        """Whether BN is folded into the quantized weight (a BN and a weight quantizer)."""
        return self.bn is not None and self.weight_quantizer is not None

    @property
    def batch_statistics(self) -> bool:
        """Whether this forward folds BN with batch statistics (training, BN not frozen)."""
        return self.folds and self.training and not self.bn_frozen

    @property
    def fast_fold_active(self) -> bool:
        """Whether this forward takes the fast fold (batch statistics, `bn_fold` 'fast')."""
        return self.bn_fold == "fast" and self.batch_statistics

    def join_folds(self, bank: FoldBank, row: int, gates_carry_fold: bool) -> None:
        """Read the fold values from row `row` of the model's `bank` (a reference: the model owns it)."""
        self.__dict__["_fold_bank"] = bank
        self.fold_row = row
        self.gates_carry_fold = gates_carry_fold

    def _batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        """Hand this batch's statistics to the running ones: at the step's end with every layer's, or now."""
        if self._in_fold_step():
            self.__dict__["_fold_bank"].statistics(self.bn, mean, var)
        else:
            bn_fold.update_running([self.bn], [mean], [var])

    def _in_fold_step(self) -> bool:
        bank = self.__dict__.get("_fold_bank")
        return bank is not None and bank.in_step

    def _fold(self) -> FoldValues:
        bank = self.__dict__.get("_fold_bank")
        return bank.values(self) if bank is not None else layer_fold_values(self)

    def _weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias of eval, frozen BN, or a layer without BN: (quantized, folded) as the op takes them."""
        quantize = self.weight_quantizer
        if self.bn is None:
            return (self.weight if quantize is None else quantize(self.weight)), self.bias
        fold = self._fold()
        return quantize(self.weight * per_channel(fold.scale, self.weight.dim(), 0)), fold.bias

    def _cache_key(self) -> tuple:
        tensors = [*self.parameters(), *self.buffers()]
        bank = getattr(self.weight_quantizer, "bank", None)
        if bank is not None:
            tensors += [bank.gamma_logits, bank.alive]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def _eval_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or (
                self.weight_quantizer is None and self.bn is None):
            return self._weight_and_bias()
        key = self._cache_key()
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = None
            self._eval_cache = (key, self._weight_and_bias())
        return self._eval_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        bn, act = self.bn, self.activation
        if type(act) is nn.ReLU and getattr(self.act_quantizer, "clips_at_zero", False):
            act = None  # the unsigned quantizer's own lower clip: the same values and gradients
        if bn is not None and self.weight_quantizer is None:
            y = bn(self.op(x, self.weight, None))
        elif not self.batch_statistics:
            y = self.op(x, *self._eval_weight_and_bias())
        else:
            fold = self._fold()
            if not self._in_fold_step():
                bn.num_batches_tracked.add_(1)  # in a step the fold bank counts every layer's batch at once
            if self.bn_fold == "fast":  # BatchNorm on the output at the unfolded scale: its batch statistics
                y = F.batch_norm(self.op(x, self._fast_weight(fold), None), bn.running_mean, bn.running_var,
                                 bn.weight, bn.bias, True, bn_fold.momentum(bn), bn.eps)
            else:
                weight = self.weight_quantizer(self.weight * per_channel(fold.scale, self.weight.dim(), 0))
                # A second, float-weight pass gives the batch statistics (§4.3).
                fused = act if type(act) in bn_fold.FUSED_CLAMPS else None
                y, mean, var = bn_fold.fold_train(self.op(x, weight, None), self.op(x, self.weight, None), bn,
                                                  fused, fold.std_run)
                self._batch_statistics(mean, var)
                act = None if fused is not None else act
        if act is not None:
            y = act(y)
        if self.act_quantizer is not None:
            y = self.act_quantizer(y)
        return y

    def _fast_weight(self, fold: FoldValues) -> Tensor:
        """Q(W·safe)/safe with the quantizer's pruning gates: the quantized folded weight at the unfolded scale. The
        division is the quantizer's per-channel output factor: carried by its pruning gates when the gate bank
        scaled them in this forward's step, else passed as `channel_scale`."""
        folded = self.weight * per_channel(fold.safe, self.weight.dim(), 0)
        in_step = self.gates_carry_fold and self._in_fold_step()
        return self.weight_quantizer(folded, channel_scale=None if in_step else fold.inverse)


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
    bn_fold: str = "exact",
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
              weight_quantizer=weight_quantizer, act_quantizer=act_quantizer, bn_fold=bn_fold, **kwargs)
    out.weight = layer.weight
    if keep_bias:
        out.bias = layer.bias
    elif layer.bias is not None:
        with torch.no_grad():
            bn.running_mean.sub_(layer.bias)
    return out

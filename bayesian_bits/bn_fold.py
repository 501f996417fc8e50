"""Batch-norm folding into the preceding conv or linear layer (SPEC B §4.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bbkernels


def per_channel(v: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.reshape(shape)


def running_std(bn: _BatchNorm) -> Tensor:
    """σ_run = sqrt(running_var + eps)."""
    return torch.sqrt(bn.running_var + bn.eps)


def momentum(bn: _BatchNorm) -> float:
    """The weight of this batch in the running statistics: `momentum`, or 1/batches seen for a cumulative average
    (momentum None, after the count was raised)."""
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def fold_scale(gamma: Tensor, std_run: Tensor) -> Tensor:
    """γ/σ_run: the per-output-channel factor folded into the weight."""
    return gamma / std_run


def fold_bias(gamma: Tensor, beta: Tensor, mean_run: Tensor, std_run: Tensor) -> Tensor:
    """β − γ·μ_run/σ_run: the bias of the folded layer in eval or frozen mode."""
    return beta - gamma * mean_run / std_run


def fold_weight(weight: Tensor, bn: _BatchNorm) -> Tensor:
    """W_f = W·γ/σ_run per output channel (dim 0): the weight the quantizer sees."""
    return weight * per_channel(fold_scale(bn.weight, running_std(bn)), weight.dim(), 0)


def folded_bias(bn: _BatchNorm) -> Tensor:
    """β − γ·μ_run/σ_run of `bn`."""
    return fold_bias(bn.weight, bn.bias, bn.running_mean, running_std(bn))


FUSED_CLAMPS = {nn.ReLU: float("inf"), nn.ReLU6: 6.0}


def fold_train(res: Tensor, y_float: Tensor, bn: _BatchNorm, activation: nn.Module | None = None,
               std_run: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out, μ_B, unbiased variance): the training output `res·(σ_run/σ_B) + (β − γ·μ_B/σ_B)` (§4.3) from the
    quantized-weight output `res` and the float-weight output `y_float` that gives the batch statistics, by the
    fused op `bbkernels::fold_bn`. A ReLU or ReLU6 `activation` is applied inside (others must follow separately);
    `std_run` is σ_run if already at hand. The running statistics are the caller's to update (`update_running`).

    With the quantizer off this equals `bn(y_float)` in train mode.
    """
    clamp_max = None if activation is None else FUSED_CLAMPS[type(activation)]
    std_run = running_std(bn) if std_run is None else std_run
    out, mean, var, _ = bbkernels.fold_bn(res, y_float, bn.weight, bn.bias, std_run, bn.eps, clamp_max)
    return out, mean, var


def untrained(bn: _BatchNorm) -> bool:
    """Whether `bn` still has the running statistics it was built with (mean 0, variance 1): it has seen no data."""
    return bool((bn.running_mean == 0).all() and (bn.running_var == 1).all())


@torch.no_grad()
def update_running(norms: Sequence[_BatchNorm], means: Sequence[Tensor], variances: Sequence[Tensor]) -> None:
    """Move each BatchNorm's running statistics towards its batch's (unbiased variance, as nn.BatchNorm does), one
    multi-tensor op per momentum."""
    groups: dict[float, list[int]] = {}
    for i, bn in enumerate(norms):
        groups.setdefault(momentum(bn), []).append(i)
    for weight, idx in groups.items():
        torch._foreach_lerp_([norms[i].running_mean for i in idx], [means[i] for i in idx], weight)
        torch._foreach_lerp_([norms[i].running_var for i in idx], [variances[i] for i in idx], weight)


def static_fold(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> None:
    """Fold `bn` into `layer` for good: weight ← W·γ/σ_run, bias ← β − γ·μ_run/σ_run (fine-tuning, §6.9)."""
    if layer.bias is not None:
        raise ValueError("static_fold expects a layer without bias (BN layers are built with bias=False)")
    with torch.no_grad():
        layer.weight = nn.Parameter(fold_weight(layer.weight, bn))
        layer.bias = nn.Parameter(folded_bias(bn))

"""Batch-norm folding into the preceding conv or linear layer (SPEC B §4.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


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


def _channel_dims(t: Tensor) -> list[int]:
    return [d for d in range(t.dim()) if d != 1]


class _FoldTrain(torch.autograd.Function):
    """out = act(res·(σ_run/σ_B) + (β − γ·μ_B/σ_B)) with (μ_B, σ_B) from y_float, as one node.

    For backward it keeps y_float and `out` (which the following quantizer saves anyway) but not res:
    Σ grad·res is recovered as (Σ grad·out − shift·Σ grad)/scale (grad is zero where a ReLU clamps).
    """

    @staticmethod
    def forward(ctx, res: Tensor, y_float: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, eps: float, clamp_max):
        m = y_float.numel() // y_float.shape[1]
        # ATen's batch-norm statistics (Welford-accurate, several times faster than var_mean here); its
        # 1/invstd is exactly σ_B = sqrt(biased var + eps). The running statistics take the unbiased variance.
        _, mean, invstd = torch.ops.aten.native_batch_norm(y_float, None, None, None, None, True, 0.0, eps)
        std = invstd.reciprocal()
        var = ((std * std - eps) * (m / (m - 1))).clamp_(min=0.0)
        scale = std_run / std
        shift = beta - gamma * mean / std
        out = torch.addcmul(per_channel(shift, res.dim(), 1), res, per_channel(scale, res.dim(), 1))
        if clamp_max is not None:
            out = out.clamp_(0.0, None if clamp_max == float("inf") else clamp_max)
        ctx.save_for_backward(y_float, out, gamma, mean, std, scale, shift)
        ctx.clamp_max, ctx.m = clamp_max, m
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mean, _grad_var):
        y_float, out, gamma, mean, std, scale, shift = ctx.saved_tensors
        m, nd = ctx.m, out.dim()
        if ctx.clamp_max == float("inf"):
            grad = torch.ops.aten.threshold_backward(grad, out, 0.0)
        elif ctx.clamp_max is not None:
            grad = torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.clamp_max)
        dims = _channel_dims(grad)
        s1 = grad.sum(dims)  # ∂L/∂shift
        s2 = ((grad * out).sum(dims) - shift * s1) / scale  # ∂L/∂scale = Σ grad·res
        d_mean = -s1 * gamma / std
        d_std = (s1 * gamma * mean - s2 * scale * std) / std**2  # via shift and scale = σ_run/σ_B
        d_var = d_std * ((m - 1) / m) / (2 * std)
        c1 = 2 * d_var / (m - 1)  # ∂L/∂y_float = c1·(y_float − μ) + ∂L/∂μ / m
        c0 = d_mean / m - c1 * mean
        d_res = grad * per_channel(scale, nd, 1)
        d_float = torch.addcmul(per_channel(c0, nd, 1), y_float, per_channel(c1, nd, 1))
        return d_res, d_float, -s1 * mean / std, s1, None, None, None


FUSED_CLAMPS = {nn.ReLU: float("inf"), nn.ReLU6: 6.0}


def fold_train(res: Tensor, y_float: Tensor, bn: _BatchNorm, activation: nn.Module | None = None,
               std_run: Tensor | None = None) -> Tensor:
    """Training output `res·(σ_run/σ_B) + (β − γ·μ_B/σ_B)` (§4.3) from the quantized-weight output `res` and
    the float-weight output `y_float` that gives the batch statistics; updates the running statistics. A ReLU
    or ReLU6 `activation` is applied inside (others must follow separately); `std_run` is σ_run if already at hand.

    With the quantizer off this equals `bn(y_float)` in train mode, running statistics included.
    """
    if y_float.numel() // y_float.shape[1] < 2:
        shape = tuple(y_float.shape)
        raise ValueError(f"BN batch statistics need more than 1 value per channel (train with batch > 1), got {shape}")
    clamp_max = None if activation is None else FUSED_CLAMPS[type(activation)]
    std_run = running_std(bn) if std_run is None else std_run
    out, mean, var = _FoldTrain.apply(res, y_float, bn.weight, bn.bias, std_run, bn.eps, clamp_max)
    with torch.no_grad():  # running statistics take the unbiased variance (as nn.BatchNorm)
        bn.running_mean.lerp_(mean, momentum(bn))
        bn.running_var.lerp_(var, momentum(bn))
    return out


def static_fold(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> None:
    """Fold `bn` into `layer` for good: weight ← W·γ/σ_run, bias ← β − γ·μ_run/σ_run (fine-tuning, §6.9)."""
    if layer.bias is not None:
        raise ValueError("static_fold expects a layer without bias (BN layers are built with bias=False)")
    with torch.no_grad():
        layer.weight = nn.Parameter(fold_weight(layer.weight, bn))
        layer.bias = nn.Parameter(folded_bias(bn))

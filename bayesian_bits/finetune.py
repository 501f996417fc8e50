"""Fixed-gate fine-tuning conversion (SPEC B §6.9, with A2's fixes: linear layers too, masks and bits saved)."""

from __future__ import annotations

import torch
from torch import nn

from . import bn_fold, gate_bank
from .graph.modules import set_module
from .layers import QuantLayer
from .quantizer import BayesianBitsQuantizer, FixedQuantizer


def _fixed(q: BayesianBitsQuantizer) -> FixedQuantizer:
    fixed = FixedQuantizer(q.x_max, signed=q.is_signed, bits=q.bit_width(), mask=q.keep_mask())
    fixed.absorbs_relu = q.absorbs_relu
    return fixed


@torch.no_grad()
def convert_to_fixed(model: nn.Module) -> nn.Module:
    """Turn a calibrated (trained) Bayesian Bits model into its fixed-gate version, in place, and return it.

    Every Bayesian Bits quantizer becomes a `FixedQuantizer` with its eval bit width (FLOAT stays float), the eval
    prune mask (fixed) and its x_max (a fresh parameter that keeps learning); the gammas disappear. Every folded BN
    is folded statically into its conv or linear layer (weight W·γ/σ_run, bias β − γ·μ_run/σ_run), freezing its
    statistics.
    Build optimizers after calling this.
    """
    if not any(isinstance(q, BayesianBitsQuantizer) for q in model.modules()):
        raise ValueError(f"{type(model).__name__} has no Bayesian Bits quantizers to fix (a float model, or already "
                         "converted); convert_to_fixed takes a prepared, trained model")
    for name, q in list(model.named_modules()):
        if isinstance(q, BayesianBitsQuantizer):
            if not q.is_calibrated:
                raise RuntimeError(f"quantizer {name} was never calibrated; run calibrate(model, images) first")
            set_module(model, name, _fixed(q))
    for layer in model.modules():
        if isinstance(layer, QuantLayer) and layer.bn is not None:
            bn_fold.static_fold(layer, layer.bn)
            layer.bn = None
    gate_bank.remove(model)
    return model

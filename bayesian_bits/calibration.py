"""The explicit initialisation step: the calibration forward that sets every quantizer's range (§1.2, §6.2)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import bn_fold
from .layers import QuantLayer
from .quantizer import BayesianBitsQuantizer, quantizers


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor) -> None:
    """Set every quantizer's range, signedness and skip state from one forward of `images` (the reference
    uses 2 training images): no_grad but train mode, so BN uses (and updates its running statistics
    with) this batch. Calling it again re-initialises the ranges in place. Restores the train/eval mode.

    A fast-folded layer whose BN has never seen data first takes its running statistics from this batch's float-weight
    output (a forward with the exact fold and momentum 1): its weight is folded with γ/σ_run and its statistics come
    from the quantized output, so from σ_run = 1, far from the data's, the folded weight would leave its calibrated
    range and the clipped output drag σ_run down with it (ARCHITECTURE.md, "BN folding").
    """
    found = [(n, q) for n, q in quantizers(model) if isinstance(q, BayesianBitsQuantizer)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no Bayesian Bits quantizers to calibrate; convert it first: "
                         "model = bayesian_bits.prepare(model, example_inputs)")
    was_training = model.training
    fresh = [m for m in model.modules() if isinstance(m, QuantLayer) and m.bn_fold == "fast" and m.folds
             and not m.bn_frozen and bn_fold.untrained(m.bn)]
    for name, q in found:
        q.calibrating = name
    try:
        model.train()
        if fresh:
            with _exact_with_momentum_one(fresh):
                model(images)
        model(images)
    finally:
        for _, q in found:
            q.calibrating = None
        model.train(was_training)
    missed = [n for n, q in found if not q.is_calibrated]
    if missed:
        raise RuntimeError(f"the calibration forward did not reach quantizers {missed}; they are never used")


@contextmanager
def _exact_with_momentum_one(layers: list[QuantLayer]):
    saved = [(layer.bn_fold, layer.bn.momentum) for layer in layers]
    try:
        for layer in layers:
            layer.bn_fold, layer.bn.momentum = "exact", 1.0
        yield
    finally:
        for layer, (fold, momentum) in zip(layers, saved, strict=True):
            layer.bn_fold, layer.bn.momentum = fold, momentum


def freeze_batch_norm(model: nn.Module) -> None:
    """Use BN running statistics from now on in every folded layer (--static-fold-bn, §4.3)."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.freeze_bn()

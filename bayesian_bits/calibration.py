"""The explicit initialisation step: the calibration forward that sets every quantizer's range (§1.2, §6.2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import QuantLayer
from .quantizer import BayesianBitsQuantizer, quantizers


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor) -> None:
    """Set every quantizer's range, signedness and skip state from one forward of `images` (the reference
    uses 2 training images): no_grad but train mode, so BN uses (and updates its running statistics
    with) this batch. Calling it again re-initialises the ranges in place. Restores the train/eval mode.
    """
    found = [(n, q) for n, q in quantizers(model) if isinstance(q, BayesianBitsQuantizer)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no Bayesian Bits quantizers to calibrate; convert it first: "
                         "model = bayesian_bits.prepare(model, example_inputs)")
    was_training = model.training
    for name, q in found:
        q.calibrating = name
    try:
        model.train()
        model(images)
    finally:
        for _, q in found:
            q.calibrating = None
        model.train(was_training)
    missed = [n for n, q in found if not q.is_calibrated]
    if missed:
        raise RuntimeError(f"the calibration forward did not reach quantizers {missed}; they are never used")


def freeze_batch_norm(model: nn.Module) -> None:
    """Use BN running statistics from now on in every folded layer (--static-fold-bn, §4.3)."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.freeze_bn()

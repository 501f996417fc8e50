"""The gate regulariser Σ_q R_q of the loss (SPEC B §3.1, §3.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .gate_bank import banks
from .quantizer import FixedQuantizer


def regularizer(model: nn.Module) -> Tensor:
    """Σ over every Bayesian Bits quantizer of its R_q (const or BOP-weighted after `assign_macs`), computed by the
    gate bank for all at once; the loss is CE + λ·regularizer(model). Zero after `convert_to_fixed`; a model without
    any quantizer is a ValueError."""
    terms = [b.row_regularizers().sum() for b in banks(model)]
    if not terms:
        if not any(isinstance(m, FixedQuantizer) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has no quantizers, so there is nothing to regularise; convert "
                             "it first: model = bayesian_bits.prepare(model, example_inputs)")
        return next(model.parameters(), torch.zeros(())).new_zeros(())
    return sum(terms[1:], terms[0])

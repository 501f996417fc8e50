"""The gate regulariser Σ_q R_q of the loss (SPEC B §3.1, §3.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantizer import BayesianBitsQuantizer


def regularizer(model: nn.Module) -> Tensor:
    """Σ over every Bayesian Bits quantizer of its R_q (const or BOP-weighted after `assign_macs`); the loss is
    CE + λ·regularizer(model). Zero for models without such quantizers (e.g. after `convert_to_fixed`)."""
    terms = [m.regularizer() for m in model.modules() if isinstance(m, BayesianBitsQuantizer)]
    if not terms:
        return next(model.parameters(), torch.zeros(())).new_zeros(())
    return torch.stack(terms).sum()

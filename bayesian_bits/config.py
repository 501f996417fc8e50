"""Quantization settings shared by the quantizers, layers and models."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from bbkernels.ladder import GATED_BITS


@dataclass(frozen=True)
class QuantConfig:
    """What the quantizers of a model do (SPEC B §1–3, §6.1). Defaults are the reference's CLI defaults except
    learned_scale: 'range' here (the Python API learns x_max unless told not to), unset on the command line.

    gamma_*_init: initial gate logits of every quantizer (the pruning logits gamma_2 always start at 6).
    include_pruning: per-output-channel pruning gates on weights (not on the logits layer or depthwise convs).
    prune_only: weights only pruned (not clipped or quantized), activations not quantized; needs
        include_pruning. Combined with fixed_8bit/fixed_48bit: fixed-bit quantization plus learned pruning.
    fixed_8bit / fixed_48bit: fixed W8A8 / W4A8 quantization with learned x_max instead of gated levels.
    weight_quant / act_quant: whether weights / layer outputs get quantizers at all.
    gating_method: 'l0' (stochastic hard-concrete) or 'fixed' (deterministic hard sigmoid) in training.
    reg_type: 'const' (every level costs 1) or 'bop' (level bit width times the layer's MACs / max MACs, §3.1).
    learned_scale: 'range' learns x_max; None keeps the calibrated x_max fixed (the operator always clips,
        so the reference's unclipped None mode is not reproduced; its buggy 'scale' mode is left out, A2).
    bn_fold: how a BatchNorm folded into a quantized layer trains (A13): 'exact' (the paper's, §4.3: a second,
        float-weight conv gives the batch statistics) or 'fast' (one conv; batch statistics of its output taken
        back to the unfolded scale). Eval, frozen BN, fine-tuning and export are the same for both.
    """

    gamma_4_init: float = 6.0
    gamma_8_init: float = 6.0
    gamma_16_init: float = 6.0
    gamma_32_init: float = 6.0
    include_pruning: bool = False
    prune_only: bool = False
    fixed_8bit: bool = False
    fixed_48bit: bool = False
    weight_quant: bool = True
    act_quant: bool = True
    gating_method: Literal["l0", "fixed"] = "l0"
    reg_type: Literal["const", "bop"] = "const"
    learned_scale: Literal["range"] | None = "range"
    bn_fold: Literal["exact", "fast"] = "exact"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("gamma_") and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                    and math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number (a gate logit), got {value!r}")
            if isinstance(f.default, bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
        if self.prune_only and not self.include_pruning:
            raise ValueError("prune_only=True needs include_pruning=True (--prune-only needs --include-pruning)")
        if self.fixed_8bit and self.fixed_48bit:
            raise ValueError("fixed_8bit and fixed_48bit are mutually exclusive; set at most one")
        if self.gating_method not in ("l0", "fixed"):
            raise ValueError(f"gating_method must be 'l0' or 'fixed', got {self.gating_method!r}")
        if self.reg_type not in ("const", "bop"):
            raise ValueError(f"reg_type must be 'const' or 'bop', got {self.reg_type!r}")
        if self.bn_fold not in ("exact", "fast"):
            raise ValueError(f"bn_fold must be 'exact' or 'fast', got {self.bn_fold!r}")
        if self.learned_scale not in ("range", None):
            raise ValueError(
                f"learned_scale must be 'range' or None, got {self.learned_scale!r} "
                "(the reference's 'scale' mode is not implemented)"
            )

    @property
    def gamma_inits(self) -> tuple[float, ...]:
        """(gamma_4, gamma_8, gamma_16, gamma_32) initial logits."""
        return tuple(getattr(self, f"gamma_{bits}_init") for bits in GATED_BITS)

    @property
    def weight_fixed_bits(self) -> int | None:
        """Fixed weight bit width of the fixed-bit modes, None when gated."""
        return 8 if self.fixed_8bit else 4 if self.fixed_48bit else None

    @property
    def act_fixed_bits(self) -> int | None:
        """Fixed activation bit width of the fixed-bit modes, None when gated."""
        return 8 if (self.fixed_8bit or self.fixed_48bit) else None

    @property
    def quantize_acts(self) -> bool:
        """Whether layer outputs get quantizers: prune-only without a fixed-bit mode leaves them float (§6.2)."""
        return self.act_quant and not (self.prune_only and self.act_fixed_bits is None)

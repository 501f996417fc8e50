"""Quantizer modules: the Bayesian Bits gated quantizer and the fixed-bit quantizer of fine-tuning.

Both call the fused operator of `bbkernels`; this file only decides gates, modes and ranges.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import bbkernels
from bbkernels.ladder import BITS, GATED_BITS

from . import gates
from .config import QuantConfig

# The gated levels of the ladder (bbkernels/ladder.py); level `bits` has the gate logit `gamma_{bits}`, the name
# checkpoints store it under.
LEVEL_BITS = GATED_BITS
FLOAT_BITS = 32  # bit width reported for float tensors (no quantizer, prune-only weights)


def _check_float(x: Tensor, who: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{who} quantizes floating-point tensors, got {x.dtype}; cast the input with .float()")


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


class _Quantizer(nn.Module):
    """Shared state: the learned clip bound `x_max` and the signedness (a buffer, mirrored as a Python bool)."""

    def __init__(self, x_max: float, signed: bool, learn_range: bool) -> None:
        super().__init__()
        self.x_max = nn.Parameter(torch.tensor([float(x_max)]), requires_grad=learn_range)
        self.register_buffer("signed", torch.tensor(signed))

    def _sync(self) -> None:
        """Refresh the Python mirrors of buffers (the operator takes Python values; no host sync per step)."""
        self._signed = bool(self.signed)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()


class BayesianBitsQuantizer(_Quantizer):
    """Gated residual quantizer of one tensor (SPEC B §1): learned x_max, gates gamma_4…gamma_32, optional
    per-output-channel pruning logits gamma_2.

    Ranges are set by the first forward under `calibrate` (§1.2); using it earlier raises RuntimeError.
    In training the gates are hard-concrete samples, in eval 0/1 thresholds (§1.9); a gate whose logit
    reaches −2 in training is switched off for good together with all gates above it (§1.8).
    """

    def __init__(
        self,
        channels: int | None = None,
        *,
        gamma_inits: tuple[float, float, float, float] = (6.0, 6.0, 6.0, 6.0),
        gating_method: str = "l0",
        fixed_bits: int | None = None,
        prune_only: bool = False,
        learn_range: bool = True,
    ) -> None:
        # Placeholders until calibration, as the reference's x_min = −10, x_max = 10 (§1.1).
        super().__init__(10.0, False, learn_range)
        self.register_buffer("x_min", torch.tensor([-10.0]))
        self.register_buffer("initialized", torch.tensor(False))
        for bits, init in zip(LEVEL_BITS, gamma_inits, strict=True):
            setattr(self, f"gamma_{bits}", nn.Parameter(torch.tensor([float(init)])))
        # gamma_2 starts at 6.0, hard-coded as in the reference (§1.11).
        self.gamma_2 = nn.Parameter(torch.full((channels,), 6.0)) if channels else None
        self.register_buffer("alive", torch.ones(len(LEVEL_BITS), dtype=torch.bool))  # the permanent skip ratchet
        self.gating_method = gating_method
        self.fixed_bits = fixed_bits
        self.prune_only = prune_only
        self.bop_weight: float | None = None  # MACs / max MACs under reg_type 'bop' (§3.2), else None
        self.calibrating: str | None = None  # set by `calibrate`: the module name, for error messages
        self._sync()

    def _sync(self) -> None:
        super()._sync()
        self._initialized = bool(self.initialized)

    def extra_repr(self) -> str:
        channels = "" if self.gamma_2 is None else f"channels={self.gamma_2.numel()}, "
        mode = f", fixed_bits={self.fixed_bits}" if self.fixed_bits else ""
        mode += ", prune_only" if self.prune_only else ""
        return f"{channels}signed={self._signed}, gating={self.gating_method}{mode}"

    @property
    def gammas(self) -> Tensor:
        """(gamma_4, gamma_8, gamma_16, gamma_32) as one tensor."""
        return torch.cat([getattr(self, f"gamma_{bits}") for bits in LEVEL_BITS])

    @torch.no_grad()
    def _init_range(self, x: Tensor) -> None:
        """§1.2: x_min = min(data, 0), x_max = max(data, 0), signed iff x_min < 0 (sync is fine here)."""
        x_min, x_max = torch.aminmax(x.detach().float())
        x_min, x_max = x_min.clamp(max=0.0), x_max.clamp(min=0.0)
        if not float(x_max) > 0:
            raise ValueError(
                f"quantizer {self.calibrating}: the calibration data has no positive value (max {float(x_max)}), "
                "so the range would be empty; calibrate with other or more images"
            )
        self.x_min.copy_(x_min)
        self.x_max.copy_(x_max)
        self.signed.fill_(bool(x_min < 0))
        self.initialized.fill_(True)
        self._sync()

    def level_gates(self) -> Tensor:
        """(g4, g8, g16, g32), zero from the first skipped gate on; updates the ratchet in training."""
        gammas = self.gammas
        alive = self.alive & (gammas.detach() > gates.SKIP_BELOW)
        if self.training:
            self.alive.copy_(alive)
        chain = torch.cumprod(alive.to(gammas.dtype), 0)
        return gates.gate(gammas, training=self.training, method=self.gating_method) * chain

    def channel_gates(self) -> Tensor | None:
        """Per-output-channel pruning gates g2 (never skipped), or None without pruning."""
        if self.gamma_2 is None:
            return None
        return gates.gate(self.gamma_2, training=self.training, method=self.gating_method)

    def forward(self, x: Tensor) -> Tensor:
        _check_float(x, type(self).__name__)
        if self.calibrating:
            self._init_range(x)
        elif not self._initialized:
            raise RuntimeError(
                "BayesianBitsQuantizer used before its ranges were set; run bayesian_bits.calibrate(model, images) "
                "once after building the model (or load a calibrated state_dict)"
            )
        g2 = self.channel_gates()
        if self.fixed_bits:  # §1.11 steps 5–7: fixed-bit; pruning applies only in prune-only mode
            mask = g2 if self.prune_only else None
            return bbkernels.fixed_quantize(x, self.x_max, self.fixed_bits, mask, signed=self._signed)
        if self.prune_only:  # float weights times the channel gates
            return x if g2 is None else x * _channel_view(g2.to(x.dtype), x)
        return bbkernels.bb_quantize(x, self.x_max, self.level_gates(), g2, signed=self._signed)

    @torch.no_grad()
    def bit_width(self) -> int:
        """Eval bit width (§3.6): 2^(1 + number of leading eval gates that are on); fixed modes report theirs."""
        if self.fixed_bits:
            return self.fixed_bits
        if self.prune_only:
            return FLOAT_BITS  # A2: prune-only weights are float, counted at 32 bits
        gammas = self.gammas
        on = gates.eval_gate(gammas) * (self.alive & (gammas > gates.SKIP_BELOW))
        return BITS[int(torch.cumprod(on, 0).sum())]

    def expected_bits(self) -> Tensor:
        """Differentiable E[bit width] under the gate probabilities, 2 + 2·q4 + 4·q4q8 + 8·q4q8q16 + 16·q4q8q16q32
        (skipped gates count as off); the fixed modes give their bit width. Equals `bit_width` at 0/1 probabilities."""
        gammas = self.gammas
        if self.fixed_bits or self.prune_only:
            return gammas.new_tensor(float(self.bit_width()))
        alive = torch.cumprod((self.alive & (gammas.detach() > gates.SKIP_BELOW)).to(gammas.dtype), 0)
        reach = torch.cumprod(gates.prob_on(gammas) * alive, 0)
        steps = reach.new_tensor([b // 2 for b in LEVEL_BITS])  # the bits each level adds
        return 2.0 + (reach * steps).sum()

    @torch.no_grad()
    def keep_mask(self) -> Tensor | None:
        """Eval 0/1 pruning mask over output channels, or None without pruning."""
        return None if self.gamma_2 is None else gates.eval_gate(self.gamma_2)

    @torch.no_grad()
    def applied_mask(self) -> Tensor | None:
        """The eval mask the forward multiplies by: ``keep_mask``, except in fixed-bit mode without prune-only,
        whose forward ignores the pruning gates (§1.11) although BOPs count them (§3.5)."""
        return None if (self.fixed_bits and not self.prune_only) else self.keep_mask()

    def regularizer(self) -> Tensor:
        """R_q of §3.1: expected level costs, full bit width per level, times q2 (mean over channels) when pruning."""
        cost = [1.0 if self.bop_weight is None else self.bop_weight * b for b in BITS]
        reach = torch.cumprod(gates.prob_on(self.gammas), 0)  # q4, q4q8, q4q8q16, q4q8q16q32
        levels = (reach * reach.new_tensor(cost[1:])).sum()
        if self.gamma_2 is None:
            return 1.0 + levels
        return (gates.prob_on(self.gamma_2) * (cost[0] + levels)).mean()


class FixedQuantizer(_Quantizer):
    """Fixed-bit quantizer of fine-tuning (§6.9): y = mask·s_b·R(clip(x)/s_b) with learned x_max.

    `bits` 0 means float (prune-only weights: mask only). Bits and mask are buffers, so checkpoints keep them.
    """

    def __init__(self, x_max: Tensor, *, signed: bool, bits: int, mask: Tensor | None = None) -> None:
        super().__init__(float(x_max.detach().reshape(())), signed, True)
        self.register_buffer("bits", torch.tensor(bits))
        self.register_buffer("mask", None if mask is None else mask.detach().clone().float())
        self._sync()

    def _sync(self) -> None:
        super()._sync()
        self._bits = int(self.bits)

    def extra_repr(self) -> str:
        return f"bits={self._bits or 'float'}, signed={self._signed}, pruned={self.mask is not None}"

    def forward(self, x: Tensor) -> Tensor:
        _check_float(x, type(self).__name__)
        if not self._bits:
            return x if self.mask is None else x * _channel_view(self.mask.to(x.dtype), x)
        return bbkernels.fixed_quantize(x, self.x_max, self._bits, self.mask, signed=self._signed)

    def bit_width(self) -> int:
        """The fixed bit width (32 for float)."""
        return self._bits or FLOAT_BITS

    def keep_mask(self) -> Tensor | None:
        """The fixed pruning mask, or None."""
        return self.mask

    def applied_mask(self) -> Tensor | None:
        """The mask the forward multiplies by: the fixed pruning mask."""
        return self.mask


Quantizer = BayesianBitsQuantizer | FixedQuantizer


def weight_quantizer(config: QuantConfig, channels: int, *, prune: bool = True) -> BayesianBitsQuantizer | None:
    """The weight quantizer a layer with `channels` outputs gets under `config` (None without weight quantization).

    `prune=False` for layers never pruned: the logits layer (which also ignores prune-only, as the reference's
    ResNet-18 does, A2) and depthwise convs (A2).
    """
    if not config.weight_quant:
        return None
    return BayesianBitsQuantizer(
        channels if (prune and config.include_pruning) else None,
        gamma_inits=config.gamma_inits,
        gating_method=config.gating_method,
        fixed_bits=config.weight_fixed_bits,
        prune_only=config.prune_only and prune,
        learn_range=config.learned_scale == "range",
    )


def activation_quantizer(config: QuantConfig) -> BayesianBitsQuantizer | None:
    """The quantizer of a layer output under `config` (None when outputs stay float)."""
    if not config.quantize_acts:
        return None
    return BayesianBitsQuantizer(
        gamma_inits=config.gamma_inits,
        gating_method=config.gating_method,
        fixed_bits=config.act_fixed_bits,
        learn_range=config.learned_scale == "range",
    )

"""Quantizer modules: the Bayesian Bits quantizer with learned gates, and the frozen quantizer of fine-tuning.

Both call the fused operator of `bbkernels`; this file only decides gates, modes and ranges.
"""

from __future__ import annotations

import warnings
from enum import StrEnum

import torch
from torch import Tensor, nn

import bbkernels
from bbkernels.ladder import BITS, GATED_BITS

from . import gates, ranges
from .gate_bank import GateBank, Row
from .graph.dataflow import FLOAT_BITS

ZERO_DATA_RANGE = 1.0  # the signed range of a quantizer whose calibration data is all zero

# The gated levels of the ladder (bbkernels/ladder.py); level `bits` has the gate logit `gamma_{bits}`, the name
# checkpoints before the gate bank stored it under.
LEVEL_BITS = GATED_BITS
LEVEL_NAMES = {f"gamma_{bits}": k for k, bits in enumerate(LEVEL_BITS)}


class Mode(StrEnum):
    """What a quantizer does to its tensor."""

    GATED = "gated"  # the residual ladder 2→4→…→32, each doubling switched by a gate (SPEC B §1)
    FIXED = "fixed"  # one bit width (--fixed-8bit / --fixed-48bit, overrides, fine-tuning; §1.11, §6.9)
    FLOAT = "float"  # not quantized, only multiplied by its channel mask (--prune-only weights, §1.11 step 6)


def _check_float(x: Tensor, who: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{who} quantizes floating-point tensors, got {x.dtype}; cast the input with .float()")


class _Quantizer(nn.Module):
    """Shared state and the one fixed-bit / float path: the learned clip bound `x_max` and the signedness (a
    buffer, mirrored as a Python bool so the operator never reads it from the device)."""

    def __init__(self, x_max: float, signed: bool, learn_range: bool) -> None:
        super().__init__()
        self.x_max = nn.Parameter(torch.tensor([float(x_max)]), requires_grad=learn_range)
        self.register_buffer("signed", torch.tensor(signed))
        # A ReLU in front that `prepare` took in: applied only while it changes something (before calibration);
        # calibrated on its output, the grid is unsigned and clips at 0 itself.
        self.absorbs_relu = False

    def _absorbed(self, x: Tensor) -> Tensor:
        return torch.relu(x) if self.absorbs_relu and not self.clips_at_zero else x

    @property
    def mode(self) -> Mode:
        raise NotImplementedError

    @property
    def is_signed(self) -> bool:
        """Whether the grid is symmetric around 0 (set by calibration: the data had negative values)."""
        return self._signed

    @property
    def is_calibrated(self) -> bool:
        """Whether the range has been set (always, for a frozen quantizer)."""
        return True

    @property
    def clips_at_zero(self) -> bool:
        """Whether the output is clipped below at 0 (a calibrated unsigned grid), so a ReLU in front changes nothing:
        neither the values nor the gradients (the clip's derivative is 0 below 0 too)."""
        return self.mode is not Mode.FLOAT and not self._signed and self.is_calibrated and \
            not getattr(self, "calibrating", None)

    def _sync(self) -> None:
        """Refresh the Python mirrors of buffers (the operator takes Python values; no host sync per step) and mark
        the range parameter, which a loaded state may have replaced, for the optimizers' projection (ranges.py)."""
        self._signed = bool(self.signed)
        ranges.track(self.x_max)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def __setstate__(self, state: dict) -> None:  # a deep copy or an unpickled module: new parameter objects
        super().__setstate__(state)
        ranges.track(self.x_max)

    def _eval_key(self) -> tuple:
        """What the eval grid depends on: the range and its sign (a gated quantizer adds its gate logits)."""
        return self.x_max.data_ptr(), self.x_max._version, self._signed

    def _deployed(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Eval: the deployed arithmetic at the eval bit width (bbkernels/deployed.py; what every export computes),
        times the channel `mask`. The grid is read to the host once per change of range or gates."""
        key, cached = self._eval_key(), self.__dict__.get("_eval_grid")
        if cached is None or cached[0] != key:
            bits = self.bit_width()
            grid = None if bits is None else bbkernels.grid(float(self.x_max.detach()), bits, self._signed)
            cached = self.__dict__["_eval_grid"] = (key, grid)
        if cached[1] is None:
            return self._fixed_or_float(x, None, mask)
        return bbkernels.deployed_quantize(x, cached[1], mask)

    def _deploys(self) -> bool:
        """Whether this forward computes the deployed arithmetic: in eval mode, outside torch.compile tracing."""
        return not self.training and not torch.compiler.is_compiling()

    def _fixed_or_float(self, x: Tensor, bits: int | None, mask: Tensor | None) -> Tensor:
        """FIXED at `bits` (None: FLOAT), times the channel `mask` (0/1 or gates) when given."""
        if bits is None:
            return x if mask is None else x * bbkernels.reference.channel_view(mask.to(x.dtype), x)
        return bbkernels.fixed_quantize(x, self.x_max, bits, mask, signed=self._signed)


class BayesianBitsQuantizer(_Quantizer):
    """The quantizer of one tensor with learned gates (SPEC B §1): learned x_max, level gate logits gamma_4…gamma_32,
    optional per-output-channel pruning logits gamma_2, in one of three modes:

    - GATED: the Bayesian Bits residual ladder, each doubling switched on or off by its gate;
    - FIXED at `fixed_bits` (the reference's fixed-bit modes): the level gates do nothing but are still regularised,
      and the pruning gates act in the forward only when `prune_only` (§1.11 steps 5–7);
    - FLOAT (prune-only weights): the tensor times its pruning gates, no quantization.

    The gate logits live in a `GateBank` row (`bank`, `row`): the model's bank after `prepare`, else a bank of one row
    held as the submodule `gate_bank`; `gamma_4` … `gamma_32`, `gammas`, `gamma_2` and `alive` are views of it.
    Ranges are set by the first forward under `calibrate` (§1.2); using it earlier raises RuntimeError.
    In training the gates are hard-concrete samples, in eval 0/1 thresholds (§1.9); a gate whose logit
    reaches −2 in training is switched off for good together with all gates above it (§1.8).
    """

    def __init__(
        self,
        channels: int | None = None,
        *,
        mode: Mode = Mode.GATED,
        fixed_bits: int | None = None,
        prune_only: bool = False,
        gamma_inits: tuple[float, float, float, float] = (6.0, 6.0, 6.0, 6.0),
        gating_method: str = "l0",
        learn_range: bool = True,
    ) -> None:
        mode = Mode(mode)
        if (mode is Mode.FIXED) != (fixed_bits is not None):
            raise ValueError(f"BayesianBitsQuantizer: fixed_bits is the bit width of mode FIXED and only of it; got "
                             f"mode={mode.value!r} with fixed_bits={fixed_bits}")
        if fixed_bits is not None and fixed_bits not in BITS:
            raise ValueError(f"BayesianBitsQuantizer: fixed_bits must be one of {BITS}, got {fixed_bits}")
        # Placeholders until calibration, as the reference's x_min = −10, x_max = 10 (§1.1).
        super().__init__(10.0, False, learn_range)
        self.register_buffer("x_min", torch.tensor([-10.0]))
        self.register_buffer("initialized", torch.tensor(False))
        self._mode = mode
        self.fixed_bits = fixed_bits
        # The reference's --prune-only: pruning gates act in FIXED mode too; FLOAT is prune-only by definition.
        self.prune_only = prune_only or mode is Mode.FLOAT
        row = Row(tuple(float(v) for v in gamma_inits), channels or None, mode is Mode.GATED,
                  fixed_bits or FLOAT_BITS, self.prune_only or mode is Mode.GATED)
        self.gate_bank = GateBank([row], gating_method)
        self.row = 0
        self._bop_weight: float | None = None
        self.calibrating: str | None = None  # set by `calibrate`: the module name, for error messages
        self._sync()

    @property
    def bank(self) -> GateBank:
        """The bank holding this quantizer's gate logits (the model's, or its own `gate_bank`)."""
        own = self._modules.get("gate_bank")
        return own if own is not None else self.__dict__["_shared_bank"]

    def join(self, bank: GateBank, row: int) -> None:
        """Read the gate logits from row `row` of `bank` from now on (its own bank is dropped; `gate_bank.merge` copied
        its values there)."""
        if "gate_bank" in self._modules:
            del self.gate_bank
        self.__dict__["_shared_bank"] = bank  # a reference, not a submodule: the model owns the bank
        self.row = row

    @property
    def mode(self) -> Mode:
        """GATED, FIXED or FLOAT (fixed at construction)."""
        return self._mode

    @property
    def gating_method(self) -> str:
        """'l0' (hard-concrete samples) or 'fixed' (hard sigmoid) in training, shared by the bank's rows."""
        return self.bank.method

    @property
    def bop_weight(self) -> float | None:
        """MACs / max MACs under reg_type 'bop' (§3.2), else None: the regulariser's level cost factor."""
        return self._bop_weight

    @bop_weight.setter
    def bop_weight(self, value: float | None) -> None:
        self._bop_weight = value
        cost = [1.0 if value is None else value * b for b in BITS]
        self.bank.level_cost[self.row] = torch.tensor(cost)

    @property
    def is_calibrated(self) -> bool:
        """Whether `calibrate` (or a loaded state_dict) has set the range."""
        return self._initialized

    def _sync(self) -> None:
        super()._sync()
        self._initialized = bool(self.initialized)

    def _eval_key(self) -> tuple:
        bank = self.bank
        return (*super()._eval_key(), self.row, bank.gamma_logits.data_ptr(), bank.gamma_logits._version,
                bank.alive.data_ptr(), bank.alive._version)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.bank.load_legacy_row(self.row, state_dict, prefix)  # a checkpoint from before the gate bank
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        channels = "" if self.gamma_2 is None else f"channels={self.gamma_2.numel()}, "
        mode = f"{self.mode.value}" + (f"({self.fixed_bits})" if self.fixed_bits else "")
        mode += ", prune_only" if self.prune_only and self.mode is Mode.FIXED else ""
        return f"{channels}{mode}, signed={self._signed}, gating={self.gating_method}"

    @property
    def gammas(self) -> Tensor:
        """(gamma_4, gamma_8, gamma_16, gamma_32): a view of the bank's parameter."""
        return self.bank.levels(self.row)

    @property
    def gamma_2(self) -> Tensor | None:
        """The per-output-channel pruning logits (a view of the bank's parameter), or None without pruning."""
        return self.bank.channels(self.row)

    @property
    def alive(self) -> Tensor:
        """The skip ratchet of the four levels (a view of the bank's buffer)."""
        return self.bank.alive[self.row]

    def __getattr__(self, name: str):
        level = LEVEL_NAMES.get(name)
        if level is not None:  # gamma_4 … gamma_32: one-element views of the bank's parameter
            return self.gammas[level:level + 1]
        return super().__getattr__(name)

    @torch.no_grad()
    def _init_range(self, x: Tensor) -> None:
        """§1.2: x_min = min(data, 0), x_max = max(data, 0), signed iff x_min < 0 (sync is fine here). Where that range
        is empty (the reference's quirk 11) it is widened, with a warning naming the quantizer: all-zero data (a
        zero-initialised head or BN scale) to ±ZERO_DATA_RANGE, data with no positive value to ±|x_min|."""
        x_min, x_max = torch.aminmax(x.detach().float())
        x_min, x_max = float(x_min.clamp(max=0.0)), float(x_max.clamp(min=0.0))
        if x_max == 0:
            if x_min == 0:
                x_min, x_max = -ZERO_DATA_RANGE, ZERO_DATA_RANGE
                cause = "is all zero (a zero-initialised layer or scale feeds it)"
            else:
                x_max = -x_min
                cause = f"has no positive value (min {x_min:g}), so the reference's range [0, max] would be empty"
            warnings.warn(f"quantizer {self.calibrating}: its calibration data {cause}; its range starts at "
                          f"[{x_min:g}, {x_max:g}] and is learned from there", stacklevel=2)
        self.x_min.fill_(x_min)
        self.x_max.fill_(x_max)
        self.signed.fill_(x_min < 0)
        self.initialized.fill_(True)
        self._sync()

    def level_gates(self) -> Tensor:
        """(g4, g8, g16, g32) of this forward, zero from the first skipped gate on (training: samples; the ratchet is
        updated)."""
        return self.bank.row_gates(self.row)[0]

    def channel_gates(self) -> Tensor | None:
        """Per-output-channel pruning gates g2 of this forward (never skipped), or None without pruning."""
        return self.bank.row_gates(self.row)[1]

    def forward(self, x: Tensor, channel_scale: Tensor | None = None) -> Tensor:
        """The quantized `x`; `channel_scale`, a per-output-channel factor, multiplies the output with the pruning
        gates (the fast BN fold's inverse scale)."""
        _check_float(x, type(self).__name__)
        x = self._absorbed(x)
        if self.calibrating:
            self._init_range(x)
        elif not self._initialized:
            raise RuntimeError(
                "BayesianBitsQuantizer used before its ranges were set; run bayesian_bits.calibrate(model, images) "
                "once after building the model (or load a calibrated state_dict)"
            )
        levels, g2 = self.bank.row_gates(self.row)
        channels = g2 if self.prune_only or self.mode is Mode.GATED else None
        # Gates that collect gradients in eval mode (the projection's saliency probe) need the residual chain.
        if channel_scale is None and self._deploys() and not (levels.requires_grad and torch.is_grad_enabled()):
            return self._deployed(x, channels)
        if channel_scale is not None:
            channels = channel_scale if channels is None else channels * channel_scale
        if self.mode is Mode.GATED:
            return bbkernels.bb_quantize(x, self.x_max, levels, channels, signed=self._signed)
        return self._fixed_or_float(x, self.fixed_bits, channels)

    @torch.no_grad()
    def bit_width(self) -> int | None:
        """Eval bit width (§3.6): 2^(1 + number of leading eval gates that are on); FIXED its bits, FLOAT None."""
        if self.mode is not Mode.GATED:
            return self.fixed_bits
        gammas = self.gammas
        on = gates.eval_gate(gammas) * (self.alive & (gammas > gates.SKIP_BELOW))
        return BITS[int(torch.cumprod(on, 0).sum())]

    def expected_bits(self) -> Tensor | None:
        """Differentiable E[bit width] under the gate probabilities, 2 + 2·q4 + 4·q4q8 + 8·q4q8q16 + 16·q4q8q16q32
        (skipped gates count as off); FIXED gives its bits, FLOAT None. Equals `bit_width` at 0/1 probabilities."""
        return None if self.mode is Mode.FLOAT else self.bank.expected_bits()[self.row]

    def regularizer(self) -> Tensor:
        """R_q of §3.1 (its row of `GateBank.row_regularizers`)."""
        return self.bank.row_regularizers()[self.row]

    @torch.no_grad()
    def keep_mask(self) -> Tensor | None:
        """Eval 0/1 pruning mask over output channels, or None without pruning."""
        gamma_2 = self.gamma_2
        return None if gamma_2 is None else gates.eval_gate(gamma_2)

    @torch.no_grad()
    def applied_mask(self) -> Tensor | None:
        """The eval mask the forward multiplies by: ``keep_mask``, except in FIXED mode without prune-only, whose
        forward ignores the pruning gates (§1.11) although BOPs count them (§3.5)."""
        return self.keep_mask() if self.prune_only or self.mode is Mode.GATED else None


class FixedQuantizer(_Quantizer):
    """The frozen quantizer of fine-tuning and export (§6.9): FIXED at `bits`, or FLOAT when `bits` is None, times a
    fixed 0/1 channel mask; y = mask·s_b·R(clip(x)/s_b) with x_max still learned. No gates.

    Bits and mask are buffers, so checkpoints keep them (a FLOAT quantizer stores bits 0).
    """

    def __init__(self, x_max: Tensor, *, signed: bool, bits: int | None, mask: Tensor | None = None) -> None:
        if bits is not None and bits not in BITS:
            raise ValueError(f"FixedQuantizer: bits must be one of {BITS} or None (float), got {bits}")
        super().__init__(float(x_max.detach().reshape(())), signed, True)
        self.register_buffer("bits", torch.tensor(bits or 0))
        self.register_buffer("mask", None if mask is None else mask.detach().clone().float())
        self._sync()

    def _sync(self) -> None:
        super()._sync()
        self._bits = int(self.bits) or None

    @property
    def mode(self) -> Mode:
        """FIXED, or FLOAT when the bit width is None."""
        return Mode.FLOAT if self._bits is None else Mode.FIXED

    def extra_repr(self) -> str:
        return f"bits={self._bits or 'float'}, signed={self._signed}, pruned={self.mask is not None}"

    def forward(self, x: Tensor) -> Tensor:
        _check_float(x, type(self).__name__)
        if self._deploys():
            return self._deployed(self._absorbed(x), self.mask)
        return self._fixed_or_float(self._absorbed(x), self._bits, self.mask)

    def bit_width(self) -> int | None:
        """The fixed bit width, None for FLOAT."""
        return self._bits

    def keep_mask(self) -> Tensor | None:
        """The fixed pruning mask, or None."""
        return self.mask

    def applied_mask(self) -> Tensor | None:
        """The mask the forward multiplies by: the fixed pruning mask."""
        return self.mask


Quantizer = BayesianBitsQuantizer | FixedQuantizer


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Every quantizer of `model` (Bayesian Bits and frozen ones) with its module name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BayesianBitsQuantizer, FixedQuantizer))]

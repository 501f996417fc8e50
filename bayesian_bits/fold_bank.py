"""The fold bank: the per-channel BatchNorm-fold arithmetic of every folded layer of a model, once per forward for all
of them (SPEC B §4.3, A13): σ_run = sqrt(running_var + eps), the fold scale γ/σ_run, the folded bias
β − γ·μ_run/σ_run, and for the `fast` fold the safe scale and its inverse.

A folded layer (a `QuantLayer` with a BatchNorm and a weight quantizer) is a row: a segment of `C` channels of the
flat tensors. `prepare` gives a model one bank (`bb_folds`), run by the gate bank's first node; a layer called outside
the model's forward computes its own row with the same code.

The `fast` fold divides by the fold scale; a channel whose |γ| is below `SAFE_GAMMA` is folded with ±SAFE_GAMMA instead
(the sign kept, + at 0), so the division is finite and the channel's quantized weight still carries W (γ = 0 would
zero it and, with it, the batch statistics γ learns from). Its BatchNorm still multiplies by the true γ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import bn_fold

ATTRIBUTE = "bb_folds"
SAFE_GAMMA = 1e-2  # the fast fold's smallest |γ| in the folded weight (see the module docstring)


def layer_fold_values(layer: nn.Module) -> FoldValues:
    """A folded layer's values computed for it alone (outside a model's forward, or without a fold bank)."""
    return _values([layer])[0][0]


def _values(layers: Sequence[nn.Module]) -> tuple[list[FoldValues], Tensor | None]:
    """The fold values of `layers` for their current modes (each layer's flags decide what it needs), and the flat
    inverse scale of the fast fold (None when no layer takes it)."""
    sizes = [layer.bn.num_features for layer in layers]
    gamma = torch.cat([layer.bn.weight for layer in layers])
    eps = {float(layer.bn.eps) for layer in layers}
    with torch.no_grad():
        var = torch.cat([layer.bn.running_var for layer in layers])
        if len(eps) == 1:
            std_run = torch.sqrt(var + eps.pop())
        else:  # per-layer eps, as each layer's own running_std would add it
            std_run = torch.sqrt(var + torch.cat([torch.full((n,), float(layer.bn.eps), device=var.device)
                                                  for n, layer in zip(sizes, layers, strict=True)]))
    scale = bn_fold.fold_scale(gamma, std_run)
    bias = safe = inverse = None
    if not all(layer.batch_statistics for layer in layers):  # eval or frozen BN: the folded bias
        mean_run = torch.cat([layer.bn.running_mean for layer in layers]).detach()
        bias = bn_fold.fold_bias(gamma, torch.cat([layer.bn.bias for layer in layers]), mean_run, std_run)
    if any(layer.fast_fold_active for layer in layers):
        with torch.no_grad():  # a constant of the step: γ learns through the BatchNorm that follows
            safe_gamma = torch.copysign(gamma.abs().clamp(min=SAFE_GAMMA), gamma)
            safe = safe_gamma / std_run
            inverse = std_run / safe_gamma
    split = [(None,) * len(layers) if t is None else t.split(sizes) for t in (scale, std_run, bias, safe, inverse)]
    return [FoldValues(*v) for v in zip(*split, strict=True)], inverse


@dataclass
class FoldValues:
    """One layer's share of a step: `scale` = γ/σ_run multiplies the weight before its quantizer, `std_run` is σ_run,
    `bias` the folded bias β − γ·μ_run/σ_run of eval and frozen BN (None in training when no layer needs it); for the
    fast fold in training, `safe` = safe γ/σ_run takes `scale`'s place and `inverse` = 1/safe takes the quantized
    folded weight back to the unfolded scale (else both None)."""

    scale: Tensor
    std_run: Tensor
    bias: Tensor | None
    safe: Tensor | None
    inverse: Tensor | None


class FoldBank(nn.Module):
    """The folded layers of a model (held by reference: the model owns them) and their vectorised fold arithmetic; it
    has no parameters or buffers of its own.

    `gate_index` places the fast fold's inverse scale into a gate bank's channel layout (`gate_scale`): the pruning
    gates of a fast-folded layer's weight quantizer are multiplied by it in the gate bank's own step, so the quantizer
    computes g2/safe·Q(W·safe) without an op of its own.
    """

    def __init__(self, layers: Sequence[nn.Module], gate_rows: dict[int, tuple[int, int]]) -> None:
        """`layers`: the folded layers, in forward order; `gate_rows`: for each layer (by position) whose weight
        quantizer's pruning gates act, their (start, size) in the gate bank's channel part."""
        super().__init__()
        if not layers:
            raise ValueError("FoldBank needs at least one folded layer")
        self.__dict__["layers"] = list(layers)  # references, not submodules
        self.sizes = [layer.bn.num_features for layer in layers]
        self.starts = [sum(self.sizes[:i]) for i in range(len(layers))]
        self.gate_rows = dict(gate_rows)
        self._step: list[FoldValues] | None = None
        self._statistics: list[tuple[nn.Module, Tensor, Tensor]] = []  # (BatchNorm, μ_B, var) of this forward
        self._pending = False  # a step began; its values are computed when first asked for (eval)
        self._inverse: Tensor | None = None  # this step's flat inverse scale (fast fold, training)
        self._gate_index: dict[tuple, Tensor] = {}  # per set of fast-folded layers: gate channel → inverse position

    @property
    def in_step(self) -> bool:
        """Whether a forward's step is under way (its values are the bank's)."""
        return self._pending or self._step is not None

    def begin(self) -> None:
        """Start a forward: with batch statistics compute every folded layer's values now (the gate bank may need the
        inverse scale), else when a layer first asks (an eval forward with cached weights needs none). Each layer's
        own flags decide, never the bank's, which a copied model may hold unregistered."""
        self._step = self._inverse = None
        self._statistics = []
        self._pending = True
        if any(layer.batch_statistics for layer in self.layers):
            self._compute()

    def _compute(self) -> None:
        self._step, self._inverse = _values(self.layers)
        self._pending = False
        counts = [layer.bn.num_batches_tracked for layer in self.layers if layer.batch_statistics]
        if counts:  # what each BatchNorm's forward would add, in one op
            torch._foreach_add_(counts, 1)

    def end(self) -> None:
        """Update the running statistics the forward's layers handed in (all at once), and forget its values."""
        if self._statistics:
            bn_fold.update_running(*zip(*self._statistics, strict=True))
        self._statistics = []
        self._step = self._inverse = None
        self._pending = False

    def statistics(self, bn: nn.Module, mean: Tensor, var: Tensor) -> None:
        """A layer's batch statistics of this forward, for the running ones at its end."""
        self._statistics.append((bn, mean, var))

    def values(self, layer: nn.Module) -> FoldValues:
        """`layer`'s fold values of this forward, or computed for it alone outside a forward (then the layer counts
        its BatchNorm's batches itself)."""
        if self._pending:
            self._compute()
        if self._step is not None:
            return self._step[layer.fold_row]
        return layer_fold_values(layer)

    def gate_scale(self, channels: int) -> Tensor | None:
        """This step's factor (laid out like the gate bank's channel part of `channels` entries) for the pruning gates
        of fast-folded layers: their inverse fold scale, 1 elsewhere; None when no layer is fast-folded."""
        if self._inverse is None:
            return None
        rows = self.gate_rows
        active = tuple(i for i, layer in enumerate(self.layers) if layer.fast_fold_active and i in rows)
        index = self._gate_index.get(active)
        if index is None or index.device != self._inverse.device:
            index = torch.full((channels,), sum(self.sizes), dtype=torch.long)
            for i in active:
                start, size = rows[i]
                index[start:start + size] = torch.arange(self.starts[i], self.starts[i] + size)
            index = self._gate_index[active] = index.to(self._inverse.device)
        return torch.cat([self._inverse, self._inverse.new_ones(1)])[index]

"""Projection of a gated model onto a BOP budget (SPEC A9): switch eval-mode bit levels and output channels off, or
back on, by estimated loss change per BOP, until the eval model is at or under the target.

The greedy algorithm (`project`) works on a small interface (`Board`): the exact eval total, the switches that can
be flipped now with the exact BOPs each one changes and its estimated loss change, and a way to flip them.
`ModelBoard` is that interface for a prepared model: a switch is applied by editing a gate logit (and the `alive`
ratchet, for a level switched back on) of a Bayesian Bits quantizer.

The loss estimate (`gate_saliency`) is the squared first-order Taylor term of the loss in the eval gate value
(Molchanov et al., CVPR 2019): the mean over a few batches of (∂L/∂g)², from the operator's straight-through gate
gradients. The operator gives no gradient at or above a quantizer's first off level, so a level that is off has
estimate 0 and is switched back on only after every channel with a positive estimate that fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bops
from .gate_bank import GateBank, banks
from .graph.dataflow import unwrap
from .quantizer import LEVEL_BITS, BayesianBitsQuantizer, Mode

LOW = 0.9  # the band is [LOW, 1] x target
ON_LOGIT = 0.0  # a gate switched on: above the eval threshold (gamma > −0.935)
OFF_LOGIT = -3.0  # a gate switched off: below the eval threshold and the skip rule's −2
SLACK = 1e-9  # relative margin under the target, so the reported percentage never rounds above it
STAGE = 0.7  # each shrinking stage at most multiplies the BOPs by this before the loss estimates are refreshed


@dataclass(frozen=True)
class Switch:
    """One eval gate: bit level `level` (index into LEVEL_BITS) of quantizer `quantizer`, or its output channel
    `channel` (pruning gate)."""

    quantizer: str
    level: int | None = None
    channel: int | None = None


@dataclass(frozen=True)
class Option:
    """A switch that can be flipped now. `on`: its state; `bops`: the BOPs flipping it saves (on) or adds (off);
    `loss`: estimated loss change of flipping it (≥ 0); `group` and `spare`: of the switches sharing `group`, at most
    `spare` may be switched off (a layer keeps at least one channel)."""

    switch: Switch
    on: bool
    bops: float
    loss: float
    group: str
    spare: int = 1


class Board(Protocol):
    """What `project` needs from a model."""

    def total(self) -> float:
        """Eval BOPs now."""
        ...

    def options(self) -> list[Option]:
        """Every switch that can be flipped now, with its BOP change at the current state."""
        ...

    def flip(self, switches: Sequence[Switch], on: bool) -> None:
        """Switch `switches` on or off."""
        ...

    def undo(self, switches: Sequence[Switch]) -> None:
        """Restore `switches` to their state before their last flip."""
        ...

    def refresh(self) -> None:
        """Re-estimate the loss changes at the current state."""
        ...


@dataclass
class ProjectionResult:
    """Eval BOPs before and after, and the switches turned off and back on (in order)."""

    before: float
    after: float
    switched_off: list[Switch] = field(default_factory=list)
    switched_on: list[Switch] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.switched_off or self.switched_on)


def project(board: Board, target: float, low: float = LOW) -> ProjectionResult:
    """Bring `board` to at most `target` BOPs, then fill it back towards it while it stays under.

    Over the target: in stages that each cut the BOPs by at most 30 % (the loss estimates are refreshed between stages),
    switch off the on-switches of smallest estimated loss per BOP saved, a batch per round whose savings cover the
    stage's excess (savings shrink as others are applied, so a round never overshoots by more than its last
    switch). Under `low` × target: switch on the off-switches of largest estimated loss per BOP added, while the
    exact total stays under. Raises ValueError if nothing is left to switch off while still over.
    """
    limit = target * (1.0 - SLACK)
    total = board.total()
    result = ProjectionResult(total, total)
    if total > limit:
        stages = math.ceil(math.log(limit / total) / math.log(STAGE))
        for k in range(1, stages + 1):
            stage_limit = limit if k == stages else max(limit, total * STAGE)
            total = _shrink(board, total, stage_limit, target, result)
            if k < stages:
                board.refresh()
    if total < low * target:
        total = _fill(board, total, limit, result)
    result.after = total
    return result


def _shrink(board: Board, total: float, limit: float, target: float, result: ProjectionResult) -> float:
    """Switch off the cheapest loss per BOP saved until the total is at or under `limit`; returns it."""
    while total > limit:
        ranked = sorted((o for o in board.options() if o.on and o.bops > 0),
                        key=lambda o: (o.loss / o.bops, -o.bops))
        chosen, saved, used = [], 0.0, {}
        for o in ranked:
            if used.get(o.group, 0) >= o.spare:
                continue
            used[o.group] = used.get(o.group, 0) + 1
            chosen.append(o.switch)
            saved += o.bops
            if saved >= total - limit:
                break
        if not chosen:
            raise ValueError(f"the model cannot be brought to {target:.6g} BOPs: it is at {total:.6g} with every "
                             "bit level and channel that can go switched off; raise the target")
        board.flip(chosen, on=False)
        result.switched_off += chosen
        total = board.total()
    return total


def _fill(board: Board, total: float, limit: float, result: ProjectionResult) -> float:
    """Switch on off-options, most useful per BOP first, while the exact total stays at or under `limit`; returns
    the new total. Each round takes the best options whose costs (exact one at a time) sum to half the slack; if
    together they overshoot (costs grow with each other, the total being multilinear), only the first is kept."""
    rejected: set[Switch] = set()
    while True:
        slack = limit - total
        ranked = sorted((o for o in board.options() if not o.on and 0 < o.bops <= slack and o.switch not in rejected),
                        key=lambda o: (-o.loss / o.bops, o.bops))
        if not ranked:
            return total
        chunk, cost = [], 0.0
        for o in ranked:
            if chunk and cost + o.bops > slack / 2:
                break
            chunk.append(o.switch)
            cost += o.bops
        for attempt in ([chunk, chunk[:1]] if len(chunk) > 1 else [chunk]):
            board.flip(attempt, on=True)
            new = board.total()
            if new <= limit:
                total = new
                result.switched_on += attempt
                break
            board.undo(attempt)
        else:
            rejected.add(chunk[0])


def _switchable_levels(q: BayesianBitsQuantizer) -> bool:
    return q.mode is Mode.GATED


def _bb_quantizers(model: nn.Module) -> dict[str, BayesianBitsQuantizer]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, BayesianBitsQuantizer)}


def eval_total(model: nn.Module) -> float:
    """Eval BOPs of `model`, summed exactly as `bop_report` sums them."""
    return float(sum(float(r.bops) for r in bops.term_bops(model, bops.EVAL)))


def minimum_bops(model: nn.Module) -> float:
    """The smallest eval BOPs the projection can reach: every switchable quantizer at 2 bits and every pruned
    layer with one channel (channel 0) left."""

    def bits(q: nn.Module) -> float:
        return 2.0 if isinstance(q, BayesianBitsQuantizer) and _switchable_levels(q) else bops.EVAL.bits(q)

    def keep(q: nn.Module) -> Tensor | None:
        if isinstance(q, BayesianBitsQuantizer) and q.gamma_2 is not None:
            one = torch.zeros(q.gamma_2.numel())
            one[0] = 1.0
            return one
        return bops.EVAL.keep(q)

    return float(sum(float(r.bops) for r in bops.term_bops(model, bops.Evaluator(bits, keep))))


class ModelBoard:
    """`Board` of a prepared model in its eval-gate state; `estimate()` maps switches to estimated loss changes at
    the current state (missing switches: 0; None: every estimate 0, switches ranked by BOPs alone)."""

    def __init__(self, model: nn.Module, estimate: Callable[[], dict[Switch, float]] | None = None) -> None:
        self.model = unwrap(model)
        self.quantizers = _bb_quantizers(self.model)
        self.estimate = estimate
        self.saliency: dict[Switch, float] = {}
        self._saved: dict[Switch, tuple[Tensor, Tensor]] = {}
        self.refresh()

    def refresh(self) -> None:
        self.saliency = {} if self.estimate is None else self.estimate()

    def total(self) -> float:
        return eval_total(self.model)

    def _marginals(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """∂(eval BOPs)/∂(bit width) and ∂(eval BOPs)/∂(keep mask) of every quantizer: the exact BOP change of one
        switch, since the total is affine in each bit width and in each mask entry."""
        names = {id(q): n for n, q in self.quantizers.items()}
        bit_leaves: dict[str, Tensor] = {}
        keep_leaves: dict[str, Tensor] = {}

        def bits(q: nn.Module) -> Tensor | float:
            name = names.get(id(q))
            if name is None or not _switchable_levels(q):
                return bops.EVAL.bits(q)
            if name not in bit_leaves:
                bit_leaves[name] = torch.tensor(float(q.bit_width()), dtype=torch.float64, requires_grad=True)
            return bit_leaves[name]

        def keep(q: nn.Module) -> Tensor | None:
            name = names.get(id(q))
            if name is None or q.gamma_2 is None:
                return bops.EVAL.keep(q)
            if name not in keep_leaves:
                mask = q.keep_mask().detach().to("cpu", torch.float64)
                keep_leaves[name] = mask.requires_grad_()
            return keep_leaves[name]

        total = sum(r.bops for r in bops.term_bops(self.model, bops.Evaluator(bits, keep)))
        leaves = [*bit_leaves.values(), *keep_leaves.values()]
        if isinstance(total, Tensor) and total.requires_grad:
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        else:
            grads = [None] * len(leaves)
        out = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads, strict=True)]
        n_bits = len(bit_leaves)
        bits_grad = dict(zip(bit_leaves, out[:n_bits], strict=True))
        keep_grad = dict(zip(keep_leaves, out[n_bits:], strict=True))
        return bits_grad, keep_grad

    def options(self) -> list[Option]:
        bits_grad, keep_grad = self._marginals()
        found = []
        for name, grad in bits_grad.items():
            q = self.quantizers[name]
            b = q.bit_width()
            on_levels = 0 if b == 2 else LEVEL_BITS.index(b) + 1  # levels on: 2 bits none, 4 bits level 0, ...
            slope = float(grad)
            if b > 2:  # the top level that is on: off halves the bit width
                s = Switch(name, level=on_levels - 1)
                found.append(Option(s, True, slope * b / 2, self.saliency.get(s, 0.0), name))
            if b < LEVEL_BITS[-1]:  # the first level that is off: on doubles it
                s = Switch(name, level=on_levels)
                found.append(Option(s, False, slope * b, self.saliency.get(s, 0.0), name))
        for name, grad in keep_grad.items():
            mask = self.quantizers[name].keep_mask()
            spare = int(mask.sum()) - 1
            group = f"{name}.gamma_2"
            for c, (kept, slope) in enumerate(zip(mask.tolist(), grad.tolist(), strict=True)):
                s = Switch(name, channel=c)
                found.append(Option(s, bool(kept), slope, self.saliency.get(s, 0.0), group, spare))
        return found

    def _logit(self, s: Switch) -> tuple[BayesianBitsQuantizer, Tensor, int]:
        q = self.quantizers[s.quantizer]
        if s.channel is not None:
            return q, q.gamma_2, s.channel
        return q, getattr(q, f"gamma_{LEVEL_BITS[s.level]}"), 0

    @torch.no_grad()
    def flip(self, switches: Sequence[Switch], on: bool) -> None:
        for s in switches:
            q, logit, i = self._logit(s)
            self._saved[s] = (q.gammas.clone(), q.alive.clone()) if s.channel is None else (logit[i].clone(), None)
            if not on:
                logit[i] = min(float(logit[i]), OFF_LOGIT)
            elif s.channel is not None:
                logit[i] = max(float(logit[i]), ON_LOGIT)
            else:  # exactly one more level: this one on (ratchet released), the next one off
                logit[i] = max(float(logit[i]), ON_LOGIT)
                q.alive[s.level] = True
                if s.level + 1 < len(LEVEL_BITS):
                    above = getattr(q, f"gamma_{LEVEL_BITS[s.level + 1]}")
                    above.clamp_(max=OFF_LOGIT)

    @torch.no_grad()
    def undo(self, switches: Sequence[Switch]) -> None:
        for s in switches:
            q, logit, i = self._logit(s)
            value, alive = self._saved.pop(s)
            if s.channel is not None:
                logit[i] = value
                continue
            for k, bits in enumerate(LEVEL_BITS):
                getattr(q, f"gamma_{bits}").fill_(float(value[k]))
            q.alive.copy_(alive)


@contextmanager
def _pinned_eval_gates(found: list[GateBank]):
    """Make every bank's forward use its eval gates as two leaf tensors (levels Q × 4, channels) that collect
    gradients, for the duration; yields the leaves per bank."""
    leaves: list[tuple[GateBank, tuple[Tensor, Tensor]]] = []
    try:
        for bank in found:
            levels, channels = bank.eval_gates()
            bank.pinned = (levels.clone().requires_grad_(), channels.clone().requires_grad_())
            leaves.append((bank, bank.pinned))
        yield leaves
    finally:
        for bank, _ in leaves:
            bank.pinned = None


def gate_saliency(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict[Switch, float]:
    """Estimated loss change of flipping each eval gate: the mean over `batches` of (∂L/∂g)² at the eval gates
    (eval mode). `reduce` sums a list over processes (DDP), so every process gets the same estimates."""
    inner = unwrap(model)
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    try:
        with _pinned_eval_gates(banks(inner)) as pinned:
            tensors = [t for _, pair in pinned for t in pair]
            sums = [torch.zeros(t.numel(), dtype=torch.float64) for t in tensors]
            count = 0
            for x, y in batches:
                loss = loss_fn(inner(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for acc, g in zip(sums, grads, strict=True):
                    if g is not None:
                        acc += g.detach().reshape(-1).double().cpu() ** 2
                count += 1
    finally:
        inner.train(was_training)
    totals = torch.tensor([*torch.cat(sums).tolist(), float(count)] if sums else [float(count)], dtype=torch.float64)
    if reduce is not None:
        totals = torch.tensor(reduce(totals.tolist()), dtype=torch.float64)
    means = totals[:-1] / max(float(totals[-1]), 1.0)
    per_bank, offset = {}, 0
    for bank, (levels, channels) in pinned:
        per_bank[bank] = (means[offset:offset + levels.numel()].view(levels.shape),
                          means[offset + levels.numel():offset + levels.numel() + channels.numel()])
        offset += levels.numel() + channels.numel()
    out: dict[Switch, float] = {}
    for name, q in _bb_quantizers(inner).items():
        levels, channels = per_bank[q.bank]
        if _switchable_levels(q):
            for j, v in enumerate(levels[q.row].tolist()):
                out[Switch(name, level=j)] = v
        segment = q.bank.segment(channels, q.row)
        for c, v in enumerate([] if segment is None else segment.tolist()):
            out[Switch(name, channel=c)] = v
    return out


def project_model(
    model: nn.Module, target_bops: float, estimate: Callable[[], dict[Switch, float]] | None = None, low: float = LOW
) -> ProjectionResult:
    """`project` a prepared model onto `target_bops` eval BOPs (see `project`); `estimate` gives the loss estimates
    at the current state, e.g. ``lambda: gate_saliency(model, batches)``."""
    return project(ModelBoard(model, estimate), target_bops, low)

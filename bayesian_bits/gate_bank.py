"""The gate bank: every gate logit of a set of Bayesian Bits quantizers in one flat parameter, and what is computed
from the logits for all of them at once: training samples or eval gates, the live-level chain and its ratchet, the
regulariser, expected bit widths, keep probabilities and the budget's responsive share (SPEC B §1.7–1.9, §2, §3.1).

Each quantizer is a row: four level logits (gamma_4 … gamma_32) and, with pruning, a segment of per-channel logits
(gamma_2). The flat parameter `gamma_logits` holds all level logits first (row-major, Q × 4), then every channel
segment. A quantizer reads its gates as views of the bank's per-step tensors, so a step costs a handful of kernels
for the whole model instead of a dozen per quantizer; in the backward the views' gradients are stacked back with one
op. `prepare` gives a model one bank (`bb_gates`) whose `begin` runs before each forward; a quantizer made on its own
keeps a bank of one row as its submodule `gates`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bbkernels.ladder import BITS, GATED_BITS

from . import fold_bank, gates

LEVELS = len(GATED_BITS)
STEPS = tuple(b // 2 for b in GATED_BITS)  # the bits each level adds: 2, 4, 8, 16
ATTRIBUTE = "bb_gates"


@dataclass(frozen=True)
class Row:
    """One quantizer's share of a bank: its initial level logits, its channel count (None: no pruning gates), and
    what its forward does with them (`gated`: the level chain; `prunes`: the pruning gates act in the forward)."""

    gamma_inits: tuple[float, float, float, float]
    channels: int | None
    gated: bool
    counted_bits: int  # the bits BOPs count when not gated: FIXED's bit width, 32 for float
    prunes: bool


class GateBank(nn.Module):
    """The gate logits of a set of quantizer rows (see the module docstring) and their vectorised per-step math."""

    def __init__(self, rows: Sequence[Row], method: str) -> None:
        super().__init__()
        if not rows:
            raise ValueError("GateBank needs at least one quantizer row")
        if method not in ("l0", "fixed"):
            raise ValueError(f"gating_method must be 'l0' or 'fixed', got {method!r}")
        self.method = method
        self.specs = list(rows)
        self.rows = len(rows)
        self.sizes = [r.channels or 0 for r in rows]
        self.starts = [sum(self.sizes[:i]) for i in range(len(rows))]
        levels = torch.tensor([r.gamma_inits for r in rows], dtype=torch.float32).reshape(-1)
        channels = torch.full((sum(self.sizes),), 6.0)  # gamma_2 starts at 6.0, hard-coded as in the reference (§1.11)
        self.gamma_logits = nn.Parameter(torch.cat([levels, channels]))
        self.register_buffer("alive", torch.ones(len(rows), LEVELS, dtype=torch.bool))  # the skip ratchet (§1.8)
        # Static per-row facts (non-persistent: rebuilt with the model, never read from a checkpoint).
        self._flags("gated", [r.gated for r in rows])
        self._flags("prunes", [r.prunes and bool(r.channels) for r in rows])
        self._flags("has_channels", [bool(r.channels) for r in rows])
        self.register_buffer("counted_bits", torch.tensor([float(r.counted_bits) for r in rows]), persistent=False)
        self.register_buffer("channel_row", torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(self.sizes)),
                             persistent=False)
        self.register_buffer("channel_count", torch.tensor(self.sizes, dtype=torch.float32).clamp(min=1),
                             persistent=False)
        # Level costs of the regulariser (§3.1): 1 per level, or MACs/max MACs times the bit width after assign_macs.
        self.register_buffer("level_cost", torch.ones(len(rows), len(BITS)), persistent=False)
        self.register_buffer("steps", torch.tensor(STEPS, dtype=torch.float32), persistent=False)
        self._step: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None  # this forward's gates per row
        self._eval_cache: tuple[tuple, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] | None = None
        self.pinned: tuple[Tensor, Tensor] | None = None  # fixed gates (levels Q×4, channels) that replace the math
        self._legacy_rows = 0  # rows filled from per-quantizer checkpoint keys during a load

    def _flags(self, name: str, values: list[bool]) -> None:
        self.register_buffer(name, torch.tensor(values, dtype=torch.bool), persistent=False)

    # -- views ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _split(flat: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """(level part rows × 4, channel part) of `flat` laid out like `gamma_logits`, as one split (its backward is a
        single cat)."""
        levels, channels = flat.split([rows * LEVELS, flat.numel() - rows * LEVELS])
        return levels.view(rows, LEVELS), channels

    def level_rows(self, flat: Tensor) -> Tensor:
        """The level part (Q × 4) of a tensor laid out like `gamma_logits`."""
        return flat[: self.rows * LEVELS].view(self.rows, LEVELS)

    def channel_part(self, flat: Tensor) -> Tensor:
        """The channel part (all segments) of a tensor laid out like `gamma_logits`."""
        return flat[self.rows * LEVELS:]

    def segment(self, part: Tensor, row: int) -> Tensor | None:
        """Row `row`'s segment of a tensor laid out like the channel part (None without pruning gates)."""
        n = self.sizes[row]
        return part[self.starts[row]:self.starts[row] + n] if n else None

    def channel_rows(self, flat: Tensor) -> list[Tensor | None]:
        """Per row, its channel segment of a tensor laid out like `gamma_logits` (None without pruning gates)."""
        part = self.channel_part(flat)
        return [self.segment(part, row) for row in range(self.rows)]

    def levels(self, row: int) -> Tensor:
        """Row `row`'s level logits (4), a view of the parameter."""
        return self.level_rows(self.gamma_logits)[row]

    def channels(self, row: int) -> Tensor | None:
        """Row `row`'s pruning logits, a view of the parameter, or None."""
        return self.segment(self.channel_part(self.gamma_logits), row)

    # -- gates -------------------------------------------------------------------------------------------------------
    def _gates(self, logits: Tensor, alive: Tensor, rows: int, training: bool) -> tuple[Tensor, Tensor]:
        """(level gates rows × 4, channel gates) for `logits` laid out as the rows' share of `gamma_logits`: samples or
        hard sigmoids in training (updating the ratchet `alive` in place), 0/1 in eval; every level gate from the first
        skipped one on is 0 (§1.8)."""
        if self.pinned is not None:
            return self.pinned
        g = gates.gate(logits, training=training, method=self.method)
        level_logits = logits[: rows * LEVELS].detach().view(rows, LEVELS)
        live = alive & (level_logits > gates.SKIP_BELOW)
        if training:
            alive.copy_(live)
        levels, channels = self._split(g, rows)
        return levels * torch.cumprod(live, 1), channels

    def begin(self) -> None:
        """Compute every row's gates for the coming forward (training: one sample per gate and forward), after the
        model's fold bank began its step (the fast fold's inverse scales multiply the pruning gates they apply to)."""
        folds = self.__dict__.get("folds")
        scale = None
        if folds is not None:
            folds.begin()
            scale = folds.gate_scale(self.channel_row.numel())
        training = self.training
        cacheable = not training and not torch.is_grad_enabled() and self.pinned is None and scale is None \
            and not torch.compiler.is_compiling()
        key = (self.gamma_logits._version, self.alive._version, self.gamma_logits.data_ptr(), self.alive.data_ptr())
        if cacheable and self._eval_cache is not None and self._eval_cache[0] == key:
            self._step = self._eval_cache[1]
            return
        levels, channels = self._gates(self.gamma_logits, self.alive, self.rows, training)
        if scale is not None:
            channels = channels * scale
        # unbind / split: one stack / cat in the backward instead of a scatter per quantizer
        segments = channels.split([n for n in self.sizes if n]) if channels.numel() else ()
        by_row, it = [], iter(segments)
        for n in self.sizes:
            by_row.append(next(it) if n else None)
        self._step = (levels.unbind(0), tuple(by_row))
        if cacheable:
            self._eval_cache = (key, self._step)

    def end(self) -> None:
        """Forget the forward's gates (a quantizer called on its own afterwards computes its row again)."""
        self._step = None
        folds = self.__dict__.get("folds")
        if folds is not None:
            folds.end()

    def forward(self, value: Any, stage: str) -> Any:
        """`value` unchanged, after `begin` (stage 'begin') or `end` ('end'): the nodes `prepare` puts at the start and
        the end of a model's graph."""
        if stage == "begin":
            self.begin()
        else:
            self.end()
        return value

    def row_gates(self, row: int) -> tuple[Tensor, Tensor | None]:
        """Row `row`'s (level gates (4), channel gates or None) for this forward: the bank's if `begin` ran, else
        computed for this row alone (training: sampled, ratchet updated)."""
        if self._step is not None:
            return self._step[0][row], self._step[1][row]
        if self.pinned is not None:
            levels, channels = self.pinned
            return levels[row], self.segment(channels, row)
        part = self.channels(row)
        logits = self.levels(row) if part is None else torch.cat([self.levels(row), part])
        levels, channels = self._gates(logits, self.alive[row:row + 1], 1, self.training)
        return levels[0], None if part is None else channels

    @torch.no_grad()
    def eval_gates(self) -> tuple[Tensor, Tensor]:
        """(eval level gates Q × 4 with the skip rule, eval channel gates), whatever the mode."""
        pinned, self.pinned = self.pinned, None
        try:
            return self._gates(self.gamma_logits, self.alive.clone(), self.rows, False)
        finally:
            self.pinned = pinned

    # -- regulariser, expectations, the budget's share ----------------------------------------------------------------
    def _per_row_channel_sum(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.rows).index_add(0, self.channel_row, values)

    def mean_per_row(self, values: Tensor) -> Tensor:
        """Per row, the mean of `values` (laid out like the channel part) over its channels (0 without any)."""
        return self._per_row_channel_sum(values) / self.channel_count

    def row_regularizers(self) -> Tensor:
        """R_q of §3.1 per row: the expected level costs (full bit width per level), times the mean keep probability of
        its channels when it has pruning gates, else plus the constant 1."""
        level_logits, channel_logits = self._split(self.gamma_logits, self.rows)
        levels = (self._reach(level_logits) * self.level_cost[:, 1:]).sum(1)
        if not self.channel_row.numel():
            return 1.0 + levels
        kept = self.mean_per_row(gates.prob_on(channel_logits))
        return torch.where(self.has_channels, kept * (self.level_cost[:, 0] + levels), 1.0 + levels)

    @staticmethod
    def _reach(level_logits: Tensor) -> Tensor:
        """(q4, q4q8, q4q8q16, q4q8q16q32) per row, q = P(z ≠ 0): as exp(cumsum(log q)), whose backward is a few ops
        where cumprod's is a dozen."""
        return torch.exp(torch.cumsum(gates.log_prob_on(level_logits), 1))

    def _chain(self) -> Tensor:
        return torch.cumprod((self.alive & (self.level_rows(self.gamma_logits).detach() > gates.SKIP_BELOW)).float(), 1)

    def expected_bits(self) -> Tensor:
        """E[bit width] per row (differentiable): 2 + Σ_k step_k·Π_{j≤k} q_j over the live chain in GATED mode, the
        fixed bits otherwise (float: 32, as BOPs count it)."""
        reach = self._reach(self.level_rows(self.gamma_logits)) * self._chain()  # a 0/1 prefix: cumprod(q·live)
        return torch.where(self.gated, 2.0 + (reach * self.steps).sum(1), self.counted_bits)

    def keep_probabilities(self) -> Tensor:
        """P(channel on) of every pruning logit (the channel part's layout)."""
        return gates.prob_on(self.channel_part(self.gamma_logits))

    @torch.no_grad()
    def responsive_share(self) -> tuple[Tensor, Tensor]:
        """(Σ over gate groups of the share of acting logits whose training sample is not pinned at 1, the number of
        groups): the groups are a GATED row's live level chain and the pruning gates of a row whose forward applies
        them (see budget.BopBudget)."""
        free = 1.0 - gates.prob_one(self.gamma_logits, self.method)
        chain = self._chain() * self.gated.unsqueeze(1)
        level_n = chain.sum(1)
        level_sum = (self.level_rows(free) * chain).sum(1)
        acts = self.prunes[self.channel_row].float()
        channel_n = self._per_row_channel_sum(acts)
        channel_sum = self._per_row_channel_sum(self.channel_part(free) * acts)
        n = torch.stack([level_n, channel_n])
        means = torch.stack([level_sum, channel_sum]) / n.clamp(min=1)
        live = (n > 0).float()
        return (means * live).sum(), live.sum()

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        legacy = self._legacy_rows == self.rows and prefix + "gamma_logits" not in state_dict
        self._legacy_rows = 0
        if legacy:  # every row came from the per-quantizer keys of a checkpoint written before the bank
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._eval_cache = None

    @torch.no_grad()
    def load_legacy_row(self, row: int, state_dict: dict, prefix: str) -> bool:
        """Take row `row`'s logits and ratchet from the per-quantizer keys of a checkpoint written before the bank
        (`gamma_4` … `gamma_32`, `gamma_2`, `alive` under `prefix`), removing them; False when there are none."""
        names = [f"{prefix}gamma_{b}" for b in GATED_BITS]
        if not all(n in state_dict for n in names):
            return False
        self.levels(row).copy_(torch.cat([state_dict.pop(n).reshape(1) for n in names]))
        channels = state_dict.pop(f"{prefix}gamma_2", None)
        if channels is not None and self.sizes[row]:
            self.channels(row).copy_(channels)
        alive = state_dict.pop(f"{prefix}alive", None)
        if alive is not None:
            self.alive[row].copy_(alive)
        self._legacy_rows += 1
        self._eval_cache = None
        return True


def banks(model: nn.Module) -> list[GateBank]:
    """Every gate bank of `model` (the one `prepare` gives it, or those of quantizers made on their own)."""
    return [m for m in model.modules() if isinstance(m, GateBank)]


def remove(model: nn.Module) -> None:
    """Take a prepared model's bank out (its graph nodes and the submodule, and the fold bank it runs): after
    `convert_to_fixed` no quantizer reads it."""
    if hasattr(model, fold_bank.ATTRIBUTE):
        delattr(model, fold_bank.ATTRIBUTE)
    if not isinstance(getattr(model, ATTRIBUTE, None), GateBank):
        return
    graph = model.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == ATTRIBUTE]:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    model.recompile()
    delattr(model, ATTRIBUTE)


def merge(banks: Sequence[tuple[GateBank, int]]) -> GateBank:
    """One bank holding the given rows (bank, row) with their current logits and ratchet, in order; the gating method
    must be the same for all."""
    methods = {b.method for b, _ in banks}
    if len(methods) != 1:
        raise ValueError(f"quantizers of one model must share a gating method, got {sorted(methods)}")
    merged = GateBank([b.specs[r] for b, r in banks], methods.pop())
    with torch.no_grad():
        for i, (b, r) in enumerate(banks):
            merged.levels(i).copy_(b.levels(r))
            if b.sizes[r]:
                merged.channels(i).copy_(b.channels(r))
            merged.alive[i].copy_(b.alive[r])
            merged.level_cost[i].copy_(b.level_cost[r])
    merged.to(banks[0][0].gamma_logits.device)
    return merged

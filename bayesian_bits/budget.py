"""A BOP budget for training (SPEC A9): dual ascent on the regulariser weight μ, switching points that keep the eval
model on the reference trajectory, then a projection onto the target.

    budget = BopBudget.for_training(model, steps_per_epoch=len(loader), epochs=epochs, target_rel_bops=0.5)
    for x, y in loader:                                   # every training step
        loss = cross_entropy(model(x), y) + budget.mu * regularizer(model)
        loss.backward(); optimizer.step(); budget.step()
        if budget.switch_due:
            budget.switch([(x, y)])                       # eval model at or under the reference now
    budget.project(batches)                               # at the end of gate training

The rule, its step size and why it is stable: ARCHITECTURE.md, "BOP budgets".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bops
from .gate_bank import banks
from .graph.dataflow import unwrap
from .projection import LOW, SLACK, ProjectionResult, eval_total, gate_saliency, minimum_bops, project_model

DEFAULT_MU = 0.1  # initial μ when none is given: the reference README's MNIST --gating-lambda
MU_RANGE = (1e-6, 1e3)  # μ is kept inside: a guard against wind-up while the gates cannot follow
MAX_VIOLATION = 1.0  # |predicted / reference − 1| is clipped to this before each update
DOWN_GAIN = 4.0  # μ falls this many times faster than it rises: over-pruning cannot be undone (ARCHITECTURE.md)
VELOCITY_SMOOTHING = 0.02  # weight of the newest step in the running mean of d log E[BOPs] / step
RATE_PER_EPOCH = 1.0  # `for_training`: the most log μ rises in one epoch (clipped violation, every gate responsive)
RAMP_FRACTION = 0.5  # `for_training`: the reference reaches the target after this share of the steps
HORIZON_EPOCHS = 2.0  # `for_training`: how far ahead the violation is predicted
SWITCHES_PER_RAMP = 8  # `for_training`: switching points along the ramp at least (else one per epoch)


class BopBudget:
    """The target (relative BOPs in % of W32A32, or GBOPs; one of the two), μ and its update, for a prepared model.

    `step()` after every optimizer step: v = clip(E[BOPs] · exp(H · r) / reference(t + H) − 1, ±1), the violation
    predicted `horizon_steps` (H) ahead from E[BOPs]'s running log-rate r per step, and
    log μ ← log μ + step_size · k · v with k = DOWN_GAIN when v < 0, else the responsive share a
    (`responsive_share`: μ rises only as fast as the gates can answer it). E[BOPs] is the differentiable twin of the
    report from the gate probabilities; the reference moves geometrically from the starting E[BOPs] to the target
    over `ramp_steps` (0: the target from the start). μ is a 0-dim tensor on the model's device, computed from the
    gate logits only, so it is identical on every DDP process and never synchronises with the host. Constructing it
    makes the regulariser BOP-weighted (`assign_macs`).

    Every `switch_steps` steps (0: never) is a switching point (`switch_due`): `switch` cuts the eval model to the
    reference, so the network trains under the switches it has lost and the final `project` only trims.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_rel_bops: float | None = None,
        target_gbops: float | None = None,
        mu: float = DEFAULT_MU,
        step_size: float = 1e-3,
        ramp_steps: int = 0,
        horizon_steps: int = 0,
        switch_steps: int = 0,
    ) -> None:
        if (target_rel_bops is None) == (target_gbops is None):
            raise ValueError("BopBudget needs exactly one of target_rel_bops (percent of W32A32) and target_gbops")
        given = target_rel_bops if target_rel_bops is not None else target_gbops
        name = "target_rel_bops" if target_rel_bops is not None else "target_gbops"
        if not (math.isfinite(given) and given > 0):
            raise ValueError(f"BopBudget: {name} must be a positive number, got {given}")
        if not (MU_RANGE[0] <= mu <= MU_RANGE[1]):
            raise ValueError(f"BopBudget: mu (the initial regulariser weight) must be in [{MU_RANGE[0]:g}, "
                             f"{MU_RANGE[1]:g}], got {mu}; pass e.g. mu={DEFAULT_MU}")
        if not step_size > 0:
            raise ValueError(f"BopBudget: step_size must be positive, got {step_size}")
        if ramp_steps < 0:
            raise ValueError(f"BopBudget: ramp_steps must be at least 0, got {ramp_steps}")
        if horizon_steps < 0:
            raise ValueError(f"BopBudget: horizon_steps must be at least 0, got {horizon_steps}")
        if switch_steps < 0:
            raise ValueError(f"BopBudget: switch_steps must be at least 0 (0: no switching points), got {switch_steps}")
        self.model = unwrap(model)
        self._banks = banks(self.model)
        bops.assign_macs(self.model)
        self.baseline = bops.baseline_bops(self.model)
        self.target_bops = (target_rel_bops / 100.0 * self.baseline if target_rel_bops is not None
                            else target_gbops * 1e9)
        floor = minimum_bops(self.model)
        if self.target_bops < floor:
            raise ValueError(f"BopBudget: {name} {given:g} is below the smallest model this configuration can reach "
                             f"({100.0 * floor / self.baseline:.4g} % of W32A32, {floor / 1e9:.4g} GBOPs: every "
                             "switchable tensor at 2 bits, one channel per pruned layer); raise it")
        self.step_size = float(step_size)
        self.ramp_steps = int(ramp_steps)
        self.horizon_steps = int(horizon_steps)
        self.switch_steps = int(switch_steps)
        self.steps = 0
        expected = bops.expected_bops(self.model).detach()
        self.start_bops = float(expected)
        self._log_mu = torch.tensor(math.log(mu), dtype=torch.float64, device=expected.device)
        self._log_expected = expected.to(torch.float64).log()  # at the last step
        self._rate = torch.zeros_like(self._log_expected)  # running mean of its change per step

    @classmethod
    def for_training(cls, model: nn.Module, *, steps_per_epoch: int, epochs: int, mu: float = DEFAULT_MU,
                     target_rel_bops: float | None = None, target_gbops: float | None = None) -> BopBudget:
        """The budget the training pipeline uses: log μ rises at most RATE_PER_EPOCH per epoch, the violation is
        predicted HORIZON_EPOCHS ahead, the reference ramps to the target over the first RAMP_FRACTION of the
        `epochs` × `steps_per_epoch` steps, and a switching point comes every epoch, or more often in short runs, so
        that the ramp has SWITCHES_PER_RAMP of them."""
        steps_per_epoch = max(steps_per_epoch, 1)
        ramp = int(RAMP_FRACTION * epochs * steps_per_epoch)
        return cls(model, target_rel_bops=target_rel_bops, target_gbops=target_gbops, mu=mu,
                   step_size=RATE_PER_EPOCH / steps_per_epoch, ramp_steps=ramp,
                   horizon_steps=int(HORIZON_EPOCHS * steps_per_epoch),
                   switch_steps=max(1, min(steps_per_epoch, ramp // SWITCHES_PER_RAMP)))

    @property
    def target_rel_bops(self) -> float:
        """The target in percent of W32A32 (the unit of `bop_report`'s relative_bops)."""
        return 100.0 * self.target_bops / self.baseline

    @property
    def mu(self) -> Tensor:
        """The regulariser weight now (0-dim float32 tensor on the model's device)."""
        return self._log_mu.exp().float()

    def reference(self, ahead: int = 0) -> float:
        """The BOPs μ steers towards `ahead` steps from now: geometric from the start to the target over the ramp."""
        step = self.steps + ahead
        if step >= self.ramp_steps or self.start_bops <= self.target_bops:
            return self.target_bops
        return self.start_bops * (self.target_bops / self.start_bops) ** (step / self.ramp_steps)

    @torch.no_grad()
    def _log_expected_now(self) -> Tensor:
        return bops.expected_bops(self.model).to(self._log_mu.device, torch.float64).log()

    @torch.no_grad()
    def responsive_share(self) -> Tensor:
        """a ∈ [0, 1]: the mean over gate groups (a quantizer's level chain, its pruning gates) of the share of acting
        logits whose training sample is not pinned at 1, 1 − P(z = 1) (`GateBank.responsive_share`). A pinned sample
        passes no data gradient, so under Adam such a logit falls at its learning rate whatever μ is: raising μ then
        only winds it up. A logit pinned at 0 counts as responsive: it matters only on the way down, where μ must be
        free to fall."""
        parts = [b.responsive_share() for b in self._banks]
        if not parts:
            return self._log_mu.new_ones(())
        total = sum(p[0].to(self._log_mu) for p in parts)
        count = sum(p[1].to(self._log_mu) for p in parts)
        return torch.where(count > 0, total / count.clamp(min=1), 1.0)

    @torch.no_grad()
    def step(self) -> None:
        """One dual-ascent update of μ from the current gate probabilities and their recent trend."""
        log_expected = self._log_expected_now()
        self._rate = self._rate + VELOCITY_SMOOTHING * (log_expected - self._log_expected - self._rate)
        self._log_expected = log_expected
        predicted = (log_expected + self.horizon_steps * self._rate).exp()
        violation = (predicted / self.reference(self.horizon_steps) - 1.0).clamp(-MAX_VIOLATION, MAX_VIOLATION)
        gain = torch.where(violation < 0, DOWN_GAIN, self.responsive_share())
        self._log_mu = (self._log_mu + self.step_size * gain * violation).clamp(*(math.log(v) for v in MU_RANGE))
        self.steps += 1

    def status(self) -> dict[str, float]:
        """Target, expected and eval relative BOPs (%) and μ, for logs and metrics (reads values to the host)."""
        expected = float(bops.expected_relative_bops(self.model).detach())
        return {"target_rel_bops": self.target_rel_bops, "expected_rel_bops": expected,
                "eval_rel_bops": bops.bop_report(self.model)["relative_bops"],
                "mu": float(self.mu)}

    @property
    def switch_due(self) -> bool:
        """Whether the last `step` ended at a switching point, where `switch` belongs."""
        return self.switch_steps > 0 and self.steps % self.switch_steps == 0

    def switch(
        self,
        batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        reduce: Callable[[list[float]], list[float]] | None = None,
    ) -> ProjectionResult:
        """A switching point: switch eval bit levels and channels off, least estimated loss per BOP first, until the
        eval model is at or under the reference now (`reference()`); nothing is switched back on (`project` does
        that at the end). Arguments as `project`'s; the loss estimates are computed only when a cut is needed."""
        now, total = self.reference(), eval_total(self.model)
        if total <= now * (1.0 - SLACK):
            return ProjectionResult(total, total)
        return self._project(now, batches, loss_fn, reduce, low=0.0)

    def project(
        self,
        batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        reduce: Callable[[list[float]], list[float]] | None = None,
        low: float = LOW,
    ) -> ProjectionResult:
        """Bring the eval model to at most the target and, when under `low` × target, back towards it (see
        `projection.project`), ranking switches by their saliency on `batches` (re-iterated at every stage; a
        one-shot iterator is kept as a list; None: by BOPs alone). `reduce` sums a list of floats over DDP
        processes so every process switches the same gates."""
        return self._project(self.target_bops, batches, loss_fn, reduce, low)

    def _project(self, target: float, batches: Iterable[tuple[Tensor, Tensor]] | None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor],
                 reduce: Callable[[list[float]], list[float]] | None, low: float) -> ProjectionResult:
        if batches is None:
            return project_model(self.model, target, None, low)
        if iter(batches) is batches:
            batches = list(batches)
        return project_model(self.model, target, lambda: gate_saliency(self.model, batches, loss_fn, reduce), low)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: μ, the step count, the ramp's start and the trend of E[BOPs]."""
        return {"log_mu": float(self._log_mu), "steps": self.steps, "start_bops": self.start_bops,
                "log_expected": float(self._log_expected), "rate": float(self._rate)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (a state without the trend, from before it was kept, restarts it)."""
        self._log_mu.fill_(float(state["log_mu"]))
        self.steps = int(state["steps"])
        self.start_bops = float(state["start_bops"])
        if "log_expected" in state:
            self._log_expected.fill_(float(state["log_expected"]))
            self._rate.fill_(float(state["rate"]))
        else:
            self._log_expected = self._log_expected_now()
            self._rate.zero_()

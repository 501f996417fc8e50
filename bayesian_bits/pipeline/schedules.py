"""Learning-rate schedules (§6.4, §6.9): parsing ``--lr-schedule`` and building the per-optimizer schedulers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR

from .errors import UsageError

SCHEDULE_HELP = (
    "'linear' (the reference's MNIST/CIFAR rule: full rate for the first 2/3 of the epochs, then linear decay "
    "towards 0, weight optimizer only), 'multistep:M1:M2...' (x0.1 at each milestone epoch, all optimizers), "
    "'cosine[:ETA_MIN]' (cosine over the epochs to ETA_MIN for the weights, to 0 for gates and ranges) or 'none'. "
    "Case-insensitive; 'MultiStepLR:' and 'CosineAnnealingLR:' are read as 'multistep:' and 'cosine:'"
)


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed ``--lr-schedule``: ``kind`` in {linear, multistep, cosine, none} and its arguments."""

    kind: str
    milestones: tuple[int, ...] = ()
    eta_min: float = 0.0


def parse_lr_schedule(text: str) -> ScheduleSpec:
    """Parse an ``--lr-schedule`` string; anything unrecognised is a ``UsageError`` (SPEC A2)."""
    head, *rest = text.strip().lower().split(":")
    try:
        if head in ("none", "linear") and not rest:
            return ScheduleSpec(head)
        if head in ("multistep", "multisteplr") and rest:
            milestones = tuple(int(m) for m in rest)
            if any(m <= 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
                raise ValueError("milestones must be increasing positive epochs")
            return ScheduleSpec("multistep", milestones=milestones)
        if head in ("cosine", "cosineannealinglr") and len(rest) <= 1:
            eta_min = float(rest[0]) if rest else 0.0
            if not (math.isfinite(eta_min) and eta_min >= 0):
                raise ValueError(f"the final learning rate {rest[0]} must be a finite number ≥ 0")
            return ScheduleSpec("cosine", eta_min=eta_min)
    except ValueError as exc:
        raise UsageError(f"--lr-schedule {text!r}: {exc}; expected {SCHEDULE_HELP}") from None
    raise UsageError(f"--lr-schedule {text!r} is not recognised; use {SCHEDULE_HELP}")


def linear_decay_factor(epochs: int):
    """The reference's MNIST/CIFAR LambdaLR factor: 1 up to epoch ``int(2E/3)``, then ``(e - E)/(ep - E)``."""
    flat = int(2 * epochs / 3)

    def factor(epoch: int) -> float:
        return 1.0 if epoch <= flat else (epoch - epochs) / (flat - epochs)

    return factor


def build_schedulers(
    spec: ScheduleSpec, optimizers: dict[str, torch.optim.Optimizer], epochs: int
) -> dict[str, LRScheduler]:
    """Per-epoch schedulers for the main phase, keyed like ``optimizers`` (``weight``, ``gate``, ``range``)."""
    if spec.kind == "linear":
        return {k: LambdaLR(opt, linear_decay_factor(epochs)) for k, opt in optimizers.items() if k == "weight"}
    if spec.kind == "multistep":
        return {k: MultiStepLR(opt, list(spec.milestones), gamma=0.1) for k, opt in optimizers.items()}
    if spec.kind == "cosine":
        return {
            k: CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=spec.eta_min if k == "weight" else 0.0)
            for k, opt in optimizers.items()
        }
    return {}


def build_finetune_schedulers(
    optimizers: dict[str, torch.optim.Optimizer], total_steps: int
) -> dict[str, LRScheduler]:
    """Fine-tuning schedule ``cosine:0`` stepped every iteration over ``total_steps`` (§6.9 step 6)."""
    return {k: CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=0.0) for k, opt in optimizers.items()}

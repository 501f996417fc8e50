"""Learned ranges stay positive: after every optimizer step, each quantizer range `x_max` that the optimizer holds is
projected onto [RANGE_FLOOR, ∞).

Projected gradient descent, not a log-parameterised range (ARCHITECTURE.md, "Learned ranges"): a step that leaves a
range above the floor is not touched, so the paper's trajectories (x_max learned directly by Adam or SGD, SPEC B
§6.3) are unchanged bit for bit; a step that would take a range to or below zero leaves it at the floor instead,
from where its gradient can lift it again. The projection is a `torch.optim` global step post-hook, so it follows
every optimizer (the pipeline's, a user's own, any `torch.optim.Optimizer` subclass) without a call to remember.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from bbkernels.reference import X_MAX_RANGE

# The least learned range: far below the ranges of real data (the MNIST demo's LeNet5 learns 0.14 to 1.35; timm's
# efficientnet_b0 calibrates some at 1e-5 on small inputs) and far inside what the kernels accept (X_MAX_RANGE).
RANGE_FLOOR = 2.0**-40  # about 9.1e-13, exact in fp32
assert X_MAX_RANGE[0] < RANGE_FLOOR

_RANGES: weakref.WeakSet[Tensor] = weakref.WeakSet()
# Per optimizer: its parameter count when last scanned and the ranges among its parameters.
_HELD: weakref.WeakKeyDictionary[Optimizer, tuple[int, list[Tensor]]] = weakref.WeakKeyDictionary()


def track(x_max: Tensor) -> None:
    """Mark `x_max` as a learned range: every optimizer step that holds it projects it onto [RANGE_FLOOR, ∞)."""
    _RANGES.add(x_max)


def held_ranges(optimizer: Optimizer) -> list[Tensor]:
    """The learned ranges among `optimizer`'s parameters (rescanned when its parameter count changes)."""
    count = sum(len(group["params"]) for group in optimizer.param_groups)  # every step: no list of them built
    held = _HELD.get(optimizer)
    if held is None or held[0] != count:
        held = (count, [p for group in optimizer.param_groups for p in group["params"] if p in _RANGES])
        _HELD[optimizer] = held
    return held[1]


@torch.no_grad()
def project(ranges: list[Tensor]) -> None:
    """Raise every range in `ranges` below RANGE_FLOOR to it, in place: one foreach op, no host synchronisation."""
    if ranges:
        torch._foreach_clamp_min_(ranges, RANGE_FLOOR)


def _after_step(optimizer: Optimizer, args: object, kwargs: object) -> None:
    project(held_ranges(optimizer))


register_optimizer_step_post_hook(_after_step)

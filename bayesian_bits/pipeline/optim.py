"""Optimizers (§6.3, §6.9): parameters split by name into weights, gates and ranges, one optimizer per group."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

GATE_MARK = "gamma_"  # BatchNorm's scale is plain "gamma", so it stays with the weights
# The reference's range group also matches x_min and s_2; here x_min is no parameter and s_2 (its 'scale' mode, A2)
# does not exist, so x_max is the only range parameter.
RANGE_MARK = "x_max"
OPTIMIZERS = ("SGD", "Adam")


def param_kind(name: str) -> str:
    """``'range'``, ``'gate'`` or ``'weight'`` for a parameter name, by the reference's substring rule."""
    if RANGE_MARK in name:
        return "range"
    if GATE_MARK in name:
        return "gate"
    return "weight"


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable named parameters grouped into ``weight``, ``gate`` and ``range`` (in ``named_parameters`` order)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"weight": [], "gate": [], "range": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[param_kind(name)].append((name, param))
    return groups


@dataclass(frozen=True)
class GroupSetting:
    """One optimizer slot: which parameter kinds it holds, its optimizer class name and learning rate."""

    kinds: tuple[str, ...]
    optimizer: str
    lr: float


def group_settings(
    optimizer: str,
    lr: float,
    optimizer_q: str | None,
    lr_q: float | None,
    optimizer_s: str | None,
    lr_s: float | None,
) -> list[GroupSetting]:
    """The reference's three slots; a trailing slot whose learning rate is None merges into the previous one.

    A slot with a learning rate but no optimizer name uses the previous slot's optimizer.
    """
    slots = [GroupSetting(("weight",), optimizer, lr)]
    for kind, opt_name, slot_lr in (("gate", optimizer_q, lr_q), ("range", optimizer_s, lr_s)):
        if slot_lr is None:
            prev = slots[-1]
            slots[-1] = GroupSetting((*prev.kinds, kind), prev.optimizer, prev.lr)
        else:
            slots.append(GroupSetting((kind,), opt_name or slots[-1].optimizer, slot_lr))
    return slots


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD always with momentum 0.9 and Nesterov; Adam with torch defaults; no weight decay (§6.3)."""
    params = list(params)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    raise UsageError(f"optimizer {name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")


def select_kinds(learn: str, quantizers_trained: bool) -> dict[str, bool]:
    """Which parameter kinds ``--learn`` trains (w weights, g gates, s ranges, b biases only).

    Gates and ranges are trained only when both weight and activation quantization are on (§6.1).
    """
    return {
        "weight": "w" in learn,
        "bias": "b" in learn,
        "gate": "g" in learn and quantizers_trained,
        "range": "s" in learn and quantizers_trained,
    }


def build_optimizers(
    model: nn.Module, settings: list[GroupSetting], learn: dict[str, bool]
) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per non-empty slot, keyed by the slot's first kind (``weight``, ``gate``, ``range``).

    Parameters that ``learn`` leaves out get ``requires_grad=False``.
    """
    groups = split_parameters(model)
    chosen: dict[str, list[nn.Parameter]] = {}
    for kind, named in groups.items():
        keep = []
        for name, param in named:
            if kind == "weight":
                wanted = learn["weight"] or (learn["bias"] and name.endswith("bias"))
            else:
                wanted = learn[kind]
            if wanted:
                keep.append(param)
            else:
                param.requires_grad_(False)
        chosen[kind] = keep
    optimizers = {}
    for slot in settings:
        params = [p for kind in slot.kinds for p in chosen[kind]]
        if params:
            optimizers[slot.kinds[0]] = make_optimizer(slot.optimizer, params, slot.lr)
    return optimizers


FINETUNE_OPTIMIZER, FINETUNE_LR = "SGD", 1e-4  # the reference's fine-tuning (§6.9 step 5), SGD with Nesterov


def build_finetune_optimizers(model: nn.Module, optimizer: str = FINETUNE_OPTIMIZER, lr: float = FINETUNE_LR,
                              ) -> dict[str, torch.optim.Optimizer]:
    """Fixed-gate fine-tuning: weights and biases with ``optimizer``, ``x_max`` with Adam, both at ``lr``."""
    groups = split_parameters(model)
    optimizers = {"weight": make_optimizer(optimizer, [p for _, p in groups["weight"]], lr)}
    ranges = [p for name, p in groups["range"] if "x_max" in name]
    if ranges:
        optimizers["range"] = make_optimizer("Adam", ranges, lr)
    return optimizers

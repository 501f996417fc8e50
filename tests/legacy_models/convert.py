"""Carry a float model's weights and BN statistics into one of our models (SPEC B §4.4).

Conv/linear layers are paired in module order with the float model's, each with the BatchNorm that
directly follows it (torchvision's ResNet-18 and MobileNetV2 register them in that order). A conv bias
in front of a BN is absorbed into the running mean, as the reference does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bayesian_bits.layers import QuantLayer


def _float_layers(model: nn.Module) -> list[tuple[str, nn.Module, _BatchNorm | None]]:
    """(name, conv or linear, following BN or None) in module order."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm))]
    out = []
    for i, (name, m) in enumerate(modules):
        if isinstance(m, _BatchNorm):
            continue
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        out.append((name, m, nxt if isinstance(nxt, _BatchNorm) else None))
    return out


@torch.no_grad()
def load_float_weights(model: nn.Module, float_model: nn.Module) -> None:
    """Copy weights, biases and BN parameters and statistics from `float_model` into `model`.

    Raises ValueError naming the first pair of layers whose shapes or BN placement disagree.
    """
    ours = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    theirs = _float_layers(float_model)
    if len(ours) != len(theirs):
        raise ValueError(
            f"float model has {len(theirs)} conv/linear layers but {type(model).__name__} has {len(ours)}; "
            "pass the matching float architecture"
        )
    for (name, layer), (fname, flayer, fbn) in zip(ours, theirs, strict=True):
        if layer.weight.shape != flayer.weight.shape or (layer.bn is None) != (fbn is None):
            raise ValueError(
                f"cannot load {fname} (weight {tuple(flayer.weight.shape)}, BN {fbn is not None}) into {name} "
                f"(weight {tuple(layer.weight.shape)}, BN {layer.bn is not None}); the architectures differ"
            )
        layer.weight.copy_(flayer.weight)
        if fbn is not None:
            layer.bn.load_state_dict(fbn.state_dict())
            if flayer.bias is not None:
                layer.bn.running_mean.sub_(flayer.bias)
        elif flayer.bias is not None:
            layer.bias.copy_(flayer.bias)

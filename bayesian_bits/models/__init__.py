"""The four models of SPEC B §5 and their factories.

`build_model(name, config)` gives the quantized model, `build_float_model(name)` its float twin (same
module names, no quantizers, plain BN). ResNet-18 and MobileNetV2 start from torchvision's model
(ImageNet weights with pretrained=True), BN statistics included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from ..config import QuantConfig
from .common import Group, Topology
from .convert import load_float_weights
from .lenet import LeNet5
from .mobilenet import MobileNetV2
from .resnet import ResNet18
from .vgg import VGG7

__all__ = [
    "MODELS",
    "VGG7",
    "Group",
    "LeNet5",
    "MobileNetV2",
    "ResNet18",
    "Topology",
    "build_float_model",
    "build_model",
    "load_float_weights",
    "torchvision_model",
]

MODELS: dict[str, Callable[[QuantConfig | None], nn.Module]] = {
    "lenet5quantized": LeNet5,
    "vggquantized": VGG7,
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
}

_TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "mobilenetv2": (torchvision.models.mobilenet_v2, torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1),
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")


def torchvision_model(name: str, pretrained: bool = False) -> nn.Module:
    """torchvision's float ResNet-18 or MobileNetV2, random init or ImageNet weights."""
    if name not in _TORCHVISION:
        raise ValueError(f"{name!r} has no torchvision counterpart; those exist for {sorted(_TORCHVISION)}")
    builder, weights = _TORCHVISION[name]
    if not pretrained:
        return builder(weights=None)
    try:
        return builder(weights=weights)
    except Exception as err:  # download/IO errors of any kind get one clear message
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise RuntimeError(
            f"could not load torchvision's pretrained {name} weights ({type(err).__name__}: {err}); "
            f"download {weights.url} to {cache}, or train without pretrained=True"
        ) from err


def _build(name: str, config: QuantConfig | None, pretrained: bool) -> nn.Module:
    _check_name(name)
    model = MODELS[name](config)
    if name in _TORCHVISION:
        load_float_weights(model, torchvision_model(name, pretrained))
    elif pretrained:
        raise ValueError(f"{name} has no pretrained weights; it is trained from scratch (drop pretrained=True)")
    return model


def build_model(name: str, config: QuantConfig | None = None, *, pretrained: bool = False) -> nn.Module:
    """The quantized model `name` under `config` (default QuantConfig()). Run `calibrate` before training."""
    return _build(name, QuantConfig() if config is None else config, pretrained)


def build_float_model(name: str, *, pretrained: bool = False) -> nn.Module:
    """The float twin of model `name`: same module names, no quantizers, BN unfolded."""
    return _build(name, None, pretrained)

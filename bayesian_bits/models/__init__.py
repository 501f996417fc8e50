"""The four models of SPEC B §5, as float models that `prepare` quantizes.

`build_model(name, config)` gives the prepared (quantized) model, `build_float_model(name)` the float model it
is prepared from: LeNet5 and VGG7 from this package, ResNet-18 and MobileNetV2 from torchvision (ImageNet weights
with pretrained=True, BN statistics included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import fx, nn

from ..config import QuantConfig
from ..prepare import prepare
from .lenet import LeNet5
from .vgg import VGG7

__all__ = ["MODELS", "VGG7", "LeNet5", "ModelSpec", "build_float_model", "build_model", "torchvision_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A paper model: its float builder (num_classes → module), input shape (C, H, W), and torchvision weights."""

    build: Callable[[int], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    weights: torchvision.models.WeightsEnum | None = None


MODELS: dict[str, ModelSpec] = {
    "lenet5quantized": ModelSpec(LeNet5, (1, 28, 28), 10),
    "vggquantized": ModelSpec(VGG7, (3, 32, 32), 10),
    "resnet18": ModelSpec(lambda n: torchvision.models.resnet18(num_classes=n), (3, 224, 224), 1000,
                          torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    # The reference's classifier is Dropout(0.0) then the linear layer (§5).
    "mobilenetv2": ModelSpec(lambda n: torchvision.models.mobilenet_v2(num_classes=n, dropout=0.0), (3, 224, 224),
                             1000, torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def torchvision_model(name: str, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    """torchvision's float ResNet-18 or MobileNetV2, random init or ImageNet weights."""
    spec = _spec(name)
    if spec.weights is None:
        raise ValueError(f"{name!r} has no torchvision counterpart; those exist for "
                         f"{sorted(n for n, s in MODELS.items() if s.weights is not None)}")
    return build_float_model(name, pretrained=pretrained, num_classes=num_classes)


def build_float_model(name: str, *, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    """The float model `name` (what `build_model` prepares), random init or, for the torchvision models,
    ImageNet weights (then with 1000 classes)."""
    spec = _spec(name)
    classes = spec.num_classes if num_classes is None else num_classes
    if not pretrained:
        return spec.build(classes)
    if spec.weights is None:
        raise ValueError(f"{name} has no pretrained weights; it is trained from scratch (drop pretrained=True)")
    if classes != spec.num_classes:
        raise ValueError(f"pretrained {name} has {spec.num_classes} classes; drop num_classes or pretrained")
    model = spec.build(classes)
    try:
        state = spec.weights.get_state_dict(progress=False)
    except Exception as err:  # download/IO errors of any kind get one clear message
        cache = f"{torch.hub.get_dir()}/checkpoints/{spec.weights.url.rsplit('/', 1)[-1]}"
        raise RuntimeError(
            f"could not load torchvision's pretrained {name} weights ({type(err).__name__}: {err}); "
            f"download {spec.weights.url} to {cache}, or train without pretrained=True"
        ) from err
    model.load_state_dict(state)
    return model


def build_model(name: str, config: QuantConfig | None = None, *, pretrained: bool = False,
                num_classes: int | None = None, input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """The quantized model `name` under `config` (default QuantConfig()): `prepare` of its float model on a
    batch-1 example of `input_shape` (C, H, W; default the model's own, which sets the MACs). Run `calibrate`
    before training."""
    spec = _spec(name)
    model = build_float_model(name, pretrained=pretrained, num_classes=num_classes)
    return prepare(model, torch.zeros(1, *(spec.input_shape if input_shape is None else input_shape)), config)

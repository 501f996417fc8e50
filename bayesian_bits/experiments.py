"""The reference's three experiments: image shape, classes, models and per-experiment defaults (§3.2, §6.4–6.5);
the quantization settings a run's options give."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import QuantConfig
from .errors import UsageError


@dataclass(frozen=True)
class Experiment:
    """What an ``--experiment`` fixes: data shape, class count, the models that fit it and its defaults."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    models: tuple[str, ...]
    default_workers: int
    default_lr_schedule: str
    mac_image_size: int  # the input side used for MAC counting (§3.2: 223 for ImageNet, same maps as 224)
    any_image_size: bool = False  # whether the models take other input sides (global pooling before the head)

    def input_shape(self, image_size: int | None = None) -> tuple[int, int, int, int]:
        """Batch-1 input shape for MAC counting; ``image_size`` overrides the side (synthetic small images)."""
        side = self.mac_image_size if image_size is None else image_size
        return (1, self.channels, side, side)


EXPERIMENTS: dict[str, Experiment] = {
    "mnist": Experiment("mnist", 1, 28, 10, ("lenet5quantized",), 2, "linear", 28),
    "cifar10": Experiment("cifar10", 3, 32, 10, ("vggquantized",), 1, "linear", 32),
    "imagenet": Experiment("imagenet", 3, 224, 1000, ("resnet18", "mobilenetv2"), 64, "multistep:10:20:40", 223, True),
}

MODELS: tuple[str, ...] = tuple(m for e in EXPERIMENTS.values() for m in e.models)


def get_experiment(name: str, model: str) -> Experiment:
    """The experiment called ``name``, checked against ``model``; a mismatch is a ``UsageError``."""
    if name not in EXPERIMENTS:
        raise UsageError(f"--experiment {name!r} is unknown; choose one of: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    if model not in MODELS:
        raise UsageError(f"--model {model!r} is unknown; choose one of: {', '.join(MODELS)}")
    if model not in exp.models:
        raise UsageError(
            f"--model {model} does not fit --experiment {name} "
            f"({exp.channels}x{exp.image_size}x{exp.image_size} images, {exp.num_classes} classes); "
            f"use --model {' or '.join(exp.models)}"
        )
    return exp


def quant_config(options: Mapping[str, Any] | argparse.Namespace) -> QuantConfig:
    """The model's ``QuantConfig`` from run options (parsed flags, or a checkpoint's ``options``; same names)."""
    values = vars(options) if isinstance(options, argparse.Namespace) else options
    return QuantConfig(**{f.name: values[f.name] for f in dataclasses.fields(QuantConfig)})

"""The experiments: the reference's three (image shape, classes, models and defaults, §3.2, §6.4–6.5), plus
Fashion-MNIST and an ImageFolder of the user's images (shape and classes from the files); which model specs fit
them; the quantization settings, per-layer overrides and the model input a run's options give."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import QuantConfig
from .errors import UsageError
from .models import SPEC_FORMS
from .prepare import FIXED_BITS


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
    any_model: bool = False  # whether every paper model may run on it (user specs run on every experiment)

    def input_shape(self, image_size: int | None = None) -> tuple[int, int, int, int]:
        """Batch-1 input shape for MAC counting; ``image_size`` overrides the side (synthetic small images)."""
        side = self.mac_image_size if image_size is None else image_size
        return (1, self.channels, side, side)


EXPERIMENTS: dict[str, Experiment] = {
    "mnist": Experiment("mnist", 1, 28, 10, ("lenet5quantized",), 2, "linear", 28),
    "cifar10": Experiment("cifar10", 3, 32, 10, ("vggquantized",), 1, "linear", 32),
    "imagenet": Experiment("imagenet", 3, 224, 1000, ("resnet18", "mobilenetv2"), 64, "multistep:10:20:40", 223, True),
    "fashion-mnist": Experiment("fashion-mnist", 1, 28, 10, ("lenet5quantized",), 2, "linear", 28, any_model=True),
    # channels and classes come from the files (these are --synthetic's); 224 is --image-size's default
    "imagefolder": Experiment("imagefolder", 3, 224, 10, (), 8, "linear", 224, True, True),
}

MODELS: tuple[str, ...] = ("lenet5quantized", "vggquantized", "resnet18", "mobilenetv2")
# The grayscale datasets, which --channels 3 reads as RGB (the gray channel repeated).
GRAY_EXPERIMENTS: tuple[str, ...] = tuple(n for n, e in EXPERIMENTS.items() if e.channels == 1)


def get_experiment(name: str, model: str) -> Experiment:
    """The experiment called ``name``, checked against ``model``; a mismatch is a ``UsageError``."""
    if name not in EXPERIMENTS:
        raise UsageError(f"--experiment {name!r} is unknown; choose one of: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    if model not in MODELS and ":" not in model:
        raise UsageError(f"--model {model!r} is unknown; choose one of: {', '.join(MODELS)}, {SPEC_FORMS}")
    if model in MODELS and not exp.any_model and model not in exp.models:
        raise UsageError(
            f"--model {model} does not fit --experiment {name} "
            f"({exp.channels}x{exp.image_size}x{exp.image_size} images, {exp.num_classes} classes); "
            f"use --model {' or '.join(exp.models)}"
        )
    return exp


def quant_config(options: Mapping[str, Any] | argparse.Namespace) -> QuantConfig:
    """The model's ``QuantConfig`` from run options (parsed flags, or a checkpoint's ``options``; same names)."""
    values = vars(options) if isinstance(options, argparse.Namespace) else options
    config = {f.name: values[f.name] for f in dataclasses.fields(QuantConfig) if f.name != "bn_fold"}
    # Checkpoints written before --bn-fold trained with the exact fold, the only one there was.
    return QuantConfig(**config, bn_fold=values.get("bn_fold") or "exact")


MAX_SIDE = 4096  # the largest image side an option may give (what it allocates stays bounded)
MAX_CLASSES = 100_000


def check_stored_options(options: Mapping[str, Any], source: str) -> None:
    """The options a file stores, as untrusted input: every entry the model is rebuilt from has its type and lies in
    its bounds, checked before anything is allocated; a ``UsageError`` naming ``source`` and the entry."""

    def refuse(name: str, what: str) -> None:
        raise UsageError(f"{source}: its stored option {name!r} {what}; it was not written by bayesian-bits, or was "
                         "edited")

    def integer(name: str, value: Any, low: int, high: int) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            refuse(name, f"must be a whole number in [{low}, {high}], got {value!r}")

    def strings(name: str, value: Any) -> None:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            refuse(name, f"must be a list of strings, got {value!r}")

    for name in ("model", "experiment"):
        if not isinstance(options.get(name), str):
            refuse(name, f"must be a string, got {options.get(name)!r}")
    if options["experiment"] not in EXPERIMENTS:
        refuse("experiment", f"must be one of {', '.join(EXPERIMENTS)}, got {options['experiment']!r}")
    for name in ("skip", "override", "model_args"):
        if options.get(name) is not None:
            strings(name, options[name])
    for name, low, high in (("num_classes", 1, MAX_CLASSES), ("synthetic_image_size", 8, MAX_SIDE)):
        if options.get(name) is not None:
            integer(name, options[name], low, high)
    info = options.get("dataset")
    if info is None:
        return
    if not isinstance(info, Mapping):
        refuse("dataset", f"must be a dict, got {type(info).__name__}")
    channels = info.get("channels")
    if channels not in (1, 3):
        refuse("dataset.channels", f"must be 1 or 3, got {channels!r}")
    integer("dataset.num_classes", info.get("num_classes"), 1, MAX_CLASSES)
    integer("dataset.image_size", info.get("image_size"), 8, MAX_SIDE)
    shape = info.get("mac_shape")
    if not (isinstance(shape, list) and len(shape) == 4):
        refuse("dataset.mac_shape", f"must be [1, channels, side, side], got {shape!r}")
    for i, (low, high) in enumerate(((1, 1), (channels, channels), (8, MAX_SIDE), (8, MAX_SIDE))):
        integer(f"dataset.mac_shape[{i}]", shape[i], low, high)
    for name in ("mean", "std"):
        values = info.get(name)
        if values is not None and not (isinstance(values, list) and len(values) == channels
                                       and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            refuse(f"dataset.{name}", f"must be {channels} finite numbers, got {values!r}")
    if info.get("classes") is not None:
        strings("dataset.classes", info["classes"])


def input_shape(options: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """The batch-1 input shape a run's options give the model (the one its MACs are counted on): the ``dataset``
    entry a run records, else (checkpoints written before it) the experiment's shape."""
    info = options.get("dataset")
    if info:
        return tuple(info["mac_shape"])  # type: ignore[return-value]
    return EXPERIMENTS[options["experiment"]].input_shape(options.get("synthetic_image_size"))


def num_classes(options: Mapping[str, Any]) -> int | None:
    """The class count a run's options give the model (None: the paper model's own)."""
    info = options.get("dataset")
    return info["num_classes"] if info else options.get("num_classes")


_OVERRIDE_VALUES = {"weight_bits": "bits", "act_bits": "bits", "prune": "bool", "gamma_inits": "floats"}


def parse_model_args(items: list[str]) -> dict[str, bool | int | float | str]:
    """``--model-args`` values (KEY=VALUE) as builder keywords: integers, finite floats, true/false, else strings;
    bad text is a ``UsageError`` naming the item and the form to use."""
    out: dict[str, bool | int | float | str] = {}
    for item in items:
        key, eq, value = (t.strip() for t in item.partition("="))
        if not eq or not key.isidentifier() or not value:
            raise UsageError(f"--model-args {item!r}: use KEY=VALUE with KEY a keyword of the builder, e.g. "
                             "img_size=28 patch_size=4")
        out[key] = _literal(value)
    return out


def _literal(text: str) -> bool | int | float | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return text


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--override`` values as prepare's ``overrides`` (pattern → settings), checked; bad text is a
    ``UsageError`` naming the item and the form to use."""
    form = "use PATTERN:KEY=VALUE[,KEY=VALUE], e.g. 'conv1:weight_bits=8,act_bits=8'"
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        pattern, sep, body = item.partition(":")
        if not sep or not pattern or not body:
            raise UsageError(f"--override {item!r}: {form}")
        settings: dict[str, Any] = {}
        for pair in body.split(","):
            key, eq, value = (t.strip() for t in pair.partition("="))
            kind = _OVERRIDE_VALUES.get(key)
            if not eq or kind is None:
                raise UsageError(f"--override {item!r}: {pair!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(_OVERRIDE_VALUES)}; {form}")
            try:
                if kind == "bits":
                    settings[key] = None if value.lower() == "none" else int(value)
                    if settings[key] is not None and settings[key] not in FIXED_BITS:
                        raise ValueError
                elif kind == "bool":
                    settings[key] = {"true": True, "false": False}[value.lower()]
                else:
                    settings[key] = [float(v) for v in value.split("/")]
                    if len(settings[key]) != 4 or not all(map(math.isfinite, settings[key])):
                        raise ValueError
            except (ValueError, KeyError):
                hint = {"bits": f"one of {'/'.join(map(str, FIXED_BITS))} or none", "bool": "true or false",
                        "floats": "4 finite numbers joined by '/', e.g. 6/6/6/6"}[kind]
                raise UsageError(f"--override {item!r}: {key}={value!r}; use {hint}") from None
        out[pattern] = {**out.get(pattern, {}), **settings}
    return out

"""The four models of SPEC B §5, as float models that `prepare` quantizes.

`build_model(name, config)` gives the prepared (quantized) model, `build_float_model(name)` the float model it
is prepared from: LeNet5 and VGG7 from this package, ResNet-18 and MobileNetV2 from torchvision (ImageNet weights
with pretrained=True, BN statistics included). Both also take a user's model spec (`resolve_float_model`):
``torchvision:<builder>`` or ``package.module:callable``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import fx, nn

from ..config import QuantConfig
from ..errors import ModelCodeError
from ..prepare import prepare
from .lenet import LeNet5
from .vgg import VGG7

__all__ = ["MODELS", "VGG7", "LeNet5", "ModelSpec", "build_float_model", "build_model", "is_paper_model",
           "resolve_float_model", "torchvision_model"]

TORCHVISION_PREFIX = "torchvision:"


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


def is_paper_model(spec: str) -> bool:
    """Whether ``spec`` names one of the four paper models (not ``torchvision:``/``module:callable``)."""
    return spec in MODELS


def _call_factory(factory: Callable[..., Any], num_classes: int | None, in_channels: int | None) -> Any:
    """Call a user factory with the keywords among ``num_classes``/``in_channels`` its signature accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
              if v is not None and (takes_all or k in params)}
    return factory(**kwargs)


def _load_pretrained(model: nn.Module, name: str) -> None:
    """Load torchvision's default weights of builder ``name``; tensors whose shape differs from the model's (the
    head, for another class count) keep their random init."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # download/IO errors of any kind get one clear message
        raise RuntimeError(f"could not load torchvision's pretrained {name} weights ({type(err).__name__}: {err}); "
                           f"download {weights.url} into {torch.hub.get_dir()}/checkpoints") from err
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def _check_spec(spec: str) -> None:
    module_name, sep, attr = spec.partition(":")
    if not is_paper_model(spec) and (not sep or not module_name or not attr):
        raise ValueError(f"unknown model {spec!r}; use one of {', '.join(MODELS)}, torchvision:<builder> or "
                         "package.module:callable")


def resolve_float_model(spec: str, *, pretrained: bool = False, num_classes: int | None = None,
                        in_channels: int | None = None, weights: str | Path | None = None,
                        trust_code: bool = True) -> nn.Module:
    """The float model of a model spec: a paper name (`build_float_model`), ``torchvision:<builder>`` (any
    ``torchvision.models`` builder; ``pretrained`` loads its default weights, all but a head of another class
    count) or ``package.module:callable`` (imported from ``sys.path``; called with ``num_classes``/``in_channels``
    where its signature takes them); then float ``weights`` loaded (`load_float_weights`). A bad spec or weights
    file is a ``ValueError`` saying what to use. A spec read from a file is not the user's word: with ``trust_code``
    False a ``package.module:callable`` spec is a `ModelCodeError` (nothing is imported) — the paper models and
    torchvision's builders need no code of anyone's."""
    model = _spec_model(spec, pretrained, num_classes, in_channels, trust_code)
    if weights is not None:
        load_float_weights(model, weights)
    return model


def _spec_model(spec: str, pretrained: bool, num_classes: int | None, in_channels: int | None,
                trust_code: bool) -> nn.Module:
    if is_paper_model(spec):
        return build_float_model(spec, pretrained=pretrained, num_classes=num_classes)
    if spec.startswith(TORCHVISION_PREFIX):
        name = spec[len(TORCHVISION_PREFIX):]
        if name not in torchvision.models.list_models(torchvision.models):
            raise ValueError(f"model {spec!r}: torchvision has no classification builder {name!r}; see "
                             "torchvision.models.list_models() (e.g. torchvision:resnet18)")
        model = torchvision.models.get_model(name, **({} if num_classes is None else {"num_classes": num_classes}))
        if pretrained:
            _load_pretrained(model, name)
        return model
    _check_spec(spec)
    module_name, _, attr = spec.partition(":")
    if not trust_code:
        raise ModelCodeError(f"model {spec!r} names code to import and run ({attr} of {module_name}), and a file "
                             f"does not choose code to run: confirm it on the command line (--model {spec}, or "
                             "--trust-model-code), or pass trust_model_code=True")
    if pretrained:
        raise ValueError(f"model {spec!r}: pretrained weights exist for torchvision builders only; load yours with "
                         "--weights PATH (weights=)")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model {spec!r}: cannot import {attr} from {module_name} ({err}); the module must be "
                         "importable from the working directory or PYTHONPATH") from None
    if not callable(target):
        raise ValueError(f"model {spec!r}: {attr} is not callable; point at a class or function returning an "
                         "nn.Module")
    model = _call_factory(target, num_classes, in_channels)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_float_weights(model: nn.Module, path: str | Path) -> None:
    """Load a float ``state_dict`` file into ``model`` (read with ``weights_only=True``; strict key match); a
    missing, foreign or mismatched file is a ``ValueError`` naming ``path``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a folder, a text file, a pickle with code: one line whatever torch raises
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"weights {path}: not a readable state_dict file ({type(exc).__name__}: {reason})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"weights {path}: holds a {type(state).__name__}, not a state_dict; save "
                         "model.state_dict() with torch.save")
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"weights {path}: {len(bad)} tensors hold NaN or infinity ({', '.join(bad[:5])}); "
                         "start from finite weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"weights {path}: does not fit the model ({' '.join(str(exc).split())[:300]})") from None


def build_model(name: str, config: QuantConfig | None = None, *, pretrained: bool = False,
                num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
                weights: str | Path | None = None, skip: Iterable[str] = (),
                overrides: Mapping[str, Mapping[str, Any]] | None = None, trust_code: bool = True) -> fx.GraphModule:
    """The quantized model of spec `name` (see `resolve_float_model`, which `trust_code` goes to) under `config`
    (default QuantConfig()): `prepare` (with `skip`, `overrides`) of its float model, with float `weights` loaded
    first, on a batch-1 example of `input_shape` (C, H, W; default the paper model's own, which sets the MACs;
    required for other specs). Run `calibrate` before training."""
    _check_spec(name)
    if input_shape is None:
        if not is_paper_model(name):
            raise ValueError(f"model {name!r}: pass input_shape=(C, H, W), the shape of one training image")
        input_shape = MODELS[name].input_shape
    model = resolve_float_model(name, pretrained=pretrained, num_classes=num_classes, in_channels=input_shape[0],
                                weights=weights, trust_code=trust_code)
    return prepare(model, torch.zeros(1, *input_shape), config, skip=skip, overrides=overrides)

"""The four models of SPEC B §5, as float models that `prepare` quantizes.

`build_model(name, config)` gives the prepared (quantized) model, `build_float_model(name)` the float model it
is prepared from: LeNet5 and VGG7 from this package, ResNet-18 and MobileNetV2 from torchvision (ImageNet weights
with pretrained=True, BN statistics included). Both also take a user's model spec (`resolve_float_model`):
``torchvision:<builder>``, ``timm:<name>`` or ``package.module:callable``.
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
TIMM_PREFIX = "timm:"
SPEC_FORMS = "torchvision:<builder>, timm:<name> or package.module:callable"
# Builder keywords that come from the run, not from model_args: keyword → what sets it.
RESERVED_ARGS = {"num_classes": "--num-classes (the dataset's classes)", "in_channels": "--channels",
                 "in_chans": "--channels", "pretrained": "--pretrained", "weights": "--pretrained / --weights",
                 "name": "--model", "model_name": "--model"}


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


def _call_factory(spec: str, factory: Callable[..., Any], num_classes: int | None, in_channels: int | None,
                  model_args: dict[str, Any]) -> nn.Module:
    """Call a user factory with ``model_args`` and the keywords among ``num_classes``/``in_channels`` its signature
    accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
              if v is not None and (takes_all or k in params)}
    return _built(spec, factory, **kwargs, **model_args)


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
        raise ValueError(f"unknown model {spec!r}; use one of {', '.join(MODELS)}, {SPEC_FORMS}")


def resolve_float_model(spec: str, *, pretrained: bool = False, num_classes: int | None = None,
                        in_channels: int | None = None, weights: str | Path | None = None,
                        model_args: Mapping[str, Any] | None = None, trust_code: bool = True) -> nn.Module:
    """The float model of a model spec: a paper name (`build_float_model`), ``torchvision:<builder>`` (any
    ``torchvision.models`` builder; ``pretrained`` loads its default weights, all but a head of another class
    count), ``timm:<name>`` (``timm.create_model``, which adapts ``in_channels`` and, with ``pretrained``, the
    head and stem of its weights) or ``package.module:callable`` (imported from ``sys.path``; called with
    ``num_classes``/``in_channels`` where its signature takes them); ``model_args`` are further keywords of the
    builder (e.g. ``img_size``/``patch_size`` of a timm ViT). Then float ``weights`` are loaded
    (`load_float_weights`). A bad spec or weights file is a ``ValueError`` saying what to use. A spec read from a
    file is not the user's word: with ``trust_code`` False a ``package.module:callable`` spec is a `ModelCodeError`
    (nothing is imported) — the paper models and torchvision's and timm's builders need no code of anyone's."""
    model_args = dict(model_args or {})
    if model_args and is_paper_model(spec):
        raise ValueError(f"model {spec!r}: the paper models take no builder arguments; drop them (--model-args)")
    taken = sorted(RESERVED_ARGS.keys() & model_args.keys())
    if taken:
        raise ValueError(f"model {spec!r}: {', '.join(taken)} in its builder arguments (--model-args) are set by "
                         f"{', '.join(RESERVED_ARGS[k] for k in taken)}; drop them there")
    model = _spec_model(spec, pretrained, num_classes, in_channels, model_args, trust_code)
    if weights is not None:
        load_float_weights(model, weights)
    return model


def _built(spec: str, build: Callable[..., Any], **kwargs: Any) -> nn.Module:
    """``build(**kwargs)``, whose bad keywords (a ``TypeError``) are a ``ValueError`` naming the spec."""
    try:
        model = build(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {spec!r}: its builder refused its arguments ({exc}); check --model-args") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: the builder returned {type(model).__name__}, not an nn.Module")
    return model


def _timm_model(spec: str, pretrained: bool, num_classes: int | None, in_channels: int | None,
                model_args: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model {spec!r}: timm is not installed; pip install 'bayesian-bits[models]' (or timm)") \
            from None
    name = spec[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        raise ValueError(f"model {spec!r}: timm has no model {name!r}; see timm.list_models('*{name[:4]}*') "
                         "(e.g. timm:resnet18, timm:vit_tiny_patch16_224)")
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_channels)) if v is not None}
    try:
        return _built(spec, timm.create_model, model_name=name, pretrained=pretrained, **kwargs, **model_args)
    except (OSError, RuntimeError) as err:  # hub and file errors of any kind get one clear message
        if not pretrained:
            raise
        raise RuntimeError(f"could not load timm's pretrained {name} weights ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:200]}); put them in the Hugging Face cache ($HF_HOME), or "
                           "train without pretrained") from None


def _spec_model(spec: str, pretrained: bool, num_classes: int | None, in_channels: int | None,
                model_args: dict[str, Any], trust_code: bool) -> nn.Module:
    if is_paper_model(spec):
        return build_float_model(spec, pretrained=pretrained, num_classes=num_classes)
    if spec.startswith(TORCHVISION_PREFIX):
        name = spec[len(TORCHVISION_PREFIX):]
        if name not in torchvision.models.list_models(torchvision.models):
            raise ValueError(f"model {spec!r}: torchvision has no classification builder {name!r}; see "
                             "torchvision.models.list_models() (e.g. torchvision:resnet18)")
        classes = {} if num_classes is None else {"num_classes": num_classes}
        model = _built(spec, torchvision.models.get_model, name=name, **classes, **model_args)
        if pretrained:
            _load_pretrained(model, name)
        return model
    if spec.startswith(TIMM_PREFIX):
        return _timm_model(spec, pretrained, num_classes, in_channels, model_args)
    _check_spec(spec)
    module_name, _, attr = spec.partition(":")
    if not trust_code:
        raise ModelCodeError(f"model {spec!r} names code to import and run ({attr} of {module_name}), and a file "
                             f"does not choose code to run: confirm it on the command line (--model {spec}, or "
                             "--trust-model-code), or pass trust_model_code=True")
    if pretrained:
        raise ValueError(f"model {spec!r}: pretrained weights exist for torchvision and timm builders only; load "
                         "yours with --weights PATH (weights=)")
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
    return _call_factory(spec, target, num_classes, in_channels, model_args)


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
                overrides: Mapping[str, Mapping[str, Any]] | None = None, model_args: Mapping[str, Any] | None = None,
                trust_code: bool = True) -> fx.GraphModule:
    """The quantized model of spec `name` (see `resolve_float_model`, which `model_args` and `trust_code` go to)
    under `config`
    (default QuantConfig()): `prepare` (with `skip`, `overrides`) of its float model, with float `weights` loaded
    first, on a batch-1 example of `input_shape` (C, H, W; default the paper model's own, which sets the MACs;
    required for other specs). Run `calibrate` before training."""
    _check_spec(name)
    if input_shape is None:
        if not is_paper_model(name):
            raise ValueError(f"model {name!r}: pass input_shape=(C, H, W), the shape of one training image")
        input_shape = MODELS[name].input_shape
    model = resolve_float_model(name, pretrained=pretrained, num_classes=num_classes, in_channels=input_shape[0],
                                weights=weights, model_args=model_args, trust_code=trust_code)
    return prepare(model, torch.zeros(1, *input_shape), config, skip=skip, overrides=overrides)

"""Rebuild the trained model of a ``bayesian-bits train`` checkpoint, in eval mode, for export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint_io
from ..checkpoint_io import load_checkpoint, load_model_state
from ..errors import CheckpointError, ModelCodeError, UsageError
from ..experiments import (
    check_stored_options,
    get_experiment,
    input_shape,
    num_classes,
    parse_model_args,
    parse_overrides,
    quant_config,
)
from ..graph.dataflow import dataflow, unwrap
from ..models import build_model


@dataclass
class Loaded:
    """An eval-mode model restored from a checkpoint, its name, the batch-1 input shape of its BOP count
    (``mac_shape``) and the batch-1 input shape it is exported for (``input_shape``)."""

    model: nn.Module
    name: str
    mac_shape: tuple[int, int, int, int]
    input_shape: tuple[int, int, int, int]
    options: dict[str, Any]

    def example(self, batch: int) -> Tensor:
        """A seeded input of the export's shape at ``batch``: images in [0, 1), or token ids 0."""
        dtype = dataflow(self.model).input_dtypes[0]
        shape = (batch, *self.input_shape[1:])
        if dtype.is_floating_point:
            return torch.rand(shape, generator=torch.Generator().manual_seed(0))
        return torch.zeros(shape, dtype=dtype)


def model_from_options(options: Any, source: str, trust_model_code: bool = False) -> nn.Module:
    """The (untrained) quantized model a checkpoint's ``options`` describe; ``source`` names the file in errors. A
    ``package.module:callable`` model is imported only with ``trust_model_code`` (a file never chooses code to run)."""
    if not isinstance(options, dict) or "model" not in options or "experiment" not in options:
        raise CheckpointError(f"{source}: has no training options; pass a file written by bayesian-bits")
    check_stored_options(options, source)
    try:
        config = quant_config(options)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: its quantization options are incomplete or invalid ({exc})") from None
    get_experiment(options["experiment"], options["model"])
    try:
        return build_model(options["model"], config, num_classes=num_classes(options),
                           input_shape=input_shape(options)[1:], skip=options.get("skip") or (),
                           overrides=parse_overrides(options.get("override") or []),
                           model_args=parse_model_args(options.get("model_args") or []), trust_code=trust_model_code)
    except ModelCodeError as exc:
        raise ModelCodeError(f"{source}: its {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{source}: its model {options['model']!r} cannot be rebuilt ({exc})") from None


def loaded_model(model: nn.Module) -> Loaded:
    """An in-memory prepared model as export input: eval mode, shapes from the example input `prepare` was given.
    Files written from it hold no training options, so loading them back needs the model (``skeleton=``)."""
    shape = dataflow(model).input_shapes[0]
    return Loaded(unwrap(model).eval(), type(unwrap(model)).__name__, shape, shape, {})


def read_export(path: str | Path, kind: str, fmt: str, version: int, skeleton: nn.Module | None,
                trust_model_code: bool = False) -> tuple[dict[str, Any], nn.Module]:
    """A ``pruned``/``packed`` file's data (read with ``weights_only=True``, digest checked) and the model it is
    assembled into: ``skeleton`` (the prepared model it was exported from, rebuilt) or, for files exported from a
    checkpoint, the model its training options describe (see `model_from_options` for ``trust_model_code``). A
    missing, damaged or foreign file is a ``CheckpointError``."""
    source = f"{kind} file {path}"
    data = checkpoint_io.load(path, f"{kind} file", f"a file written by bayesian-bits export --format {kind}")
    if data.get("format") != fmt or data.get("version") != version:
        raise CheckpointError(f"{source}: not a {fmt} file of version {version}")
    if skeleton is not None:
        return data, unwrap(skeleton)
    if not data.get("options"):
        raise CheckpointError(f"{source}: exported from an in-memory model; pass that model, prepared again, as "
                              "skeleton=bayesian_bits.prepare(float_model, example_inputs, config)")
    return data, model_from_options(data["options"], source, trust_model_code)


def load_eval_model(path: str | Path, flag: str = "CHECKPOINT", image_size: int | None = None,
                    trust_model_code: bool = False) -> Loaded:
    """Load checkpoint ``path`` the way ``train --eval-only --checkpoint`` does: build the model from the
    checkpoint's own options, restore its weights (fine-tuned ones via the fixed-gate conversion), eval mode.
    ``image_size`` overrides the side of the input the export is made for (default: the training images').
    Raises ``CheckpointError`` (naming ``flag``) for a missing, unreadable, damaged or foreign file; the file is
    read with ``weights_only=True`` and its digest checked, and a ``package.module:callable`` model it names is
    imported only with ``trust_model_code`` (`ModelCodeError` otherwise): nothing in or named by the file runs."""
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size {image_size}: must be a positive number of pixels")
    ckpt = load_checkpoint(path, flag)
    options = ckpt.get("options")
    model = model_from_options(options, f"{flag} {path}", trust_model_code)
    exp = get_experiment(options["experiment"], options["model"])
    load_model_state(model, ckpt, f"{flag} {path}")
    mac_shape = input_shape(options)
    trained = (options.get("dataset") or {}).get("image_size") or options.get("synthetic_image_size") or exp.image_size
    side = image_size or trained
    if not exp.any_image_size and side != trained:
        raise UsageError(f"--image-size {side}: {options['model']} takes {trained}×{trained} images only")
    return Loaded(model.eval(), options["model"], mac_shape, (1, mac_shape[1], side, side), options)

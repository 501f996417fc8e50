"""Rebuild the trained model of a ``bayesian-bits train`` checkpoint, in eval mode, for export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint_io import load_checkpoint, load_model_state
from ..errors import CheckpointError, UsageError
from ..experiments import get_experiment, quant_config
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


def model_from_options(options: Any, source: str) -> nn.Module:
    """The (untrained) quantized model a checkpoint's ``options`` describe; ``source`` names the file in errors."""
    if not isinstance(options, dict) or "model" not in options or "experiment" not in options:
        raise CheckpointError(f"{source}: has no training options; pass a file written by bayesian-bits")
    try:
        config = quant_config(options)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: its quantization options are incomplete or invalid ({exc})") from None
    shape = get_experiment(options["experiment"], options["model"]).input_shape(options.get("synthetic_image_size"))
    return build_model(options["model"], config, input_shape=shape[1:])


def load_eval_model(path: str | Path, flag: str = "CHECKPOINT", image_size: int | None = None) -> Loaded:
    """Load checkpoint ``path`` the way ``train --eval-only --checkpoint`` does: build the model from the
    checkpoint's own options, restore its weights (fine-tuned ones via the fixed-gate conversion), eval mode.
    ``image_size`` overrides the side of the input the export is made for (default: the training images').
    Raises ``CheckpointError`` (naming ``flag``) for a missing, unreadable, damaged or foreign file; the file is
    read with ``weights_only=True`` and its digest checked, so no code in it is ever run."""
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size {image_size}: must be a positive number of pixels")
    ckpt = load_checkpoint(path, flag)
    options = ckpt.get("options")
    model = model_from_options(options, f"{flag} {path}")
    exp = get_experiment(options["experiment"], options["model"])
    load_model_state(model, ckpt, f"{flag} {path}")
    trained = options.get("synthetic_image_size") or exp.image_size
    side = image_size or trained
    if not exp.any_image_size and side != trained:
        raise UsageError(f"--image-size {side}: {options['model']} takes {trained}×{trained} images only")
    return Loaded(model.eval(), options["model"], exp.input_shape(options.get("synthetic_image_size")),
                  (1, exp.channels, side, side), options)

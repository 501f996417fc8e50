"""Rebuild the trained model of a ``bayesian-bits train`` checkpoint, in eval mode, for export."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..models import build_model
from ..pipeline import checkpoint
from ..pipeline.errors import UsageError
from ..pipeline.experiments import get_experiment
from ..pipeline.runner import quant_config


@dataclass
class Loaded:
    """An eval-mode model restored from a checkpoint, its name, the batch-1 input shape of its BOP count
    (``mac_shape``) and the batch-1 input shape it is exported for (``input_shape``)."""

    model: nn.Module
    name: str
    mac_shape: tuple[int, int, int, int]
    input_shape: tuple[int, int, int, int]
    options: dict[str, Any]


def load_eval_model(path: str | Path, flag: str = "CHECKPOINT", image_size: int | None = None) -> Loaded:
    """Load checkpoint ``path`` the way ``train --eval-only --checkpoint`` does: build the model from the
    checkpoint's own options, restore its weights (fine-tuned ones via the fixed-gate conversion), eval mode.
    ``image_size`` overrides the side of the input the export is made for (default: the training images').
    Raises ``UsageError`` (naming ``flag``) for a missing, unreadable or foreign file."""
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size {image_size}: must be a positive number of pixels")
    ckpt = checkpoint.load(path, flag)
    options = ckpt.get("options")
    if not isinstance(options, dict) or "model" not in options or "experiment" not in options:
        raise UsageError(f"{flag} {path}: the checkpoint has no training options; pass one written by "
                         "bayesian-bits train")
    args = argparse.Namespace(**options)
    exp = get_experiment(args.experiment, args.model)
    model = build_model(args.model, quant_config(args))
    try:
        checkpoint.load_model_state(model, ckpt)
    except RuntimeError as exc:  # state_dict mismatch: a checkpoint of another code version or model
        first = str(exc).splitlines()[0]
        raise UsageError(f"{flag} {path}: its weights do not fit {args.model} ({first})") from None
    trained = options.get("synthetic_image_size") or exp.image_size
    side = image_size or trained
    if not exp.any_image_size and side != trained:
        raise UsageError(f"--image-size {side}: {args.model} takes {trained}×{trained} images only")
    return Loaded(model.eval(), args.model, exp.input_shape(options.get("synthetic_image_size")),
                  (1, exp.channels, side, side), options)

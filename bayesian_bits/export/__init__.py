"""Export a trained model for deployment: ``manifest`` (JSON), ``pruned`` (float model with pruned channels
removed), ``packed`` (integer weights at their learned bit widths) and ``onnx`` (QDQ graph at the learned
precisions). ``export_model`` writes an in-memory prepared model, ``export`` a checkpoint (``bayesian-bits
export``); both run the same code."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .. import checkpoint_io
from ..checkpoint_io import write_error
from ..errors import UsageError, WriteError
from .loader import Loaded, load_eval_model, loaded_model
from .manifest import export_manifest, manifest
from .onnx import export_onnx, onnx_model, onnxruntime_session, run_onnxruntime
from .packed import export_packed, load_packed, pack
from .pruned import export_plan, export_pruned, load_pruned, pruned_model

FORMATS: dict[str, Callable[[Loaded, str | Path], str]] = {
    "manifest": export_manifest,
    "pruned": export_pruned,
    "packed": export_packed,
    "onnx": export_onnx,
}


def export(checkpoint: str | Path, fmt: str, out: str | Path, image_size: int | None = None,
           trust_model_code: bool = False, overwrite: bool = False) -> str:
    """Write checkpoint ``checkpoint`` in format ``fmt`` to ``out`` (for inputs of side ``image_size``, default the
    training images'); returns a one-line summary. A ``package.module:callable`` model the checkpoint names is
    imported only with ``trust_model_code``. ``out`` may replace an existing file only with ``overwrite``, and never
    the checkpoint itself or any other checkpoint."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise UsageError(f"-o {out}: is the checkpoint being exported; write the export to another file")
    _probe_output(Path(out), overwrite)
    loaded = load_eval_model(checkpoint, image_size=image_size, trust_model_code=trust_model_code)
    return FORMATS[fmt](loaded, out)


def export_model(model: nn.Module, fmt: str, out: str | Path, overwrite: bool = True) -> str:
    """Write a prepared, trained model (any model of `bayesian_bits.prepare`, switched to eval mode) in format
    ``fmt`` to ``out``, for its example input's shape; returns a one-line summary. ``load_pruned`` and
    ``load_packed`` read the files back given the model prepared again (``skeleton=``). An existing ``out`` is
    replaced (unless ``overwrite`` is False), a checkpoint never."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _probe_output(Path(out), overwrite)
    return FORMATS[fmt](loaded_model(model), out)


def _probe_output(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot or may not be written: a folder in its place, a missing or read-only
    folder, a checkpoint, or (without ``overwrite``) any existing file."""
    if out.is_dir():
        raise WriteError(f"-o {out} is a folder; pass a file path (e.g. {out / 'model.out'})")
    if out.exists():
        if checkpoint_io.is_checkpoint(out):
            raise UsageError(f"-o {out}: is a training checkpoint, which export never overwrites; write to another "
                             "file")
        if not overwrite:
            raise UsageError(f"-o {out}: exists; pass --overwrite to replace it, or write to another file")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: the folder {out.parent} does not exist; create it or pick another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(out, exc) from None


__all__ = [
    "FORMATS",
    "Loaded",
    "export",
    "export_manifest",
    "export_model",
    "export_onnx",
    "export_packed",
    "export_plan",
    "export_pruned",
    "load_eval_model",
    "load_packed",
    "load_pruned",
    "loaded_model",
    "manifest",
    "onnx_model",
    "onnxruntime_session",
    "pack",
    "pruned_model",
    "run_onnxruntime",
]

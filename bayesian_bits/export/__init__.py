"""Export a trained checkpoint for deployment: ``manifest`` (JSON), ``pruned`` (float model with pruned channels
removed) and ``packed`` (integer weights at their learned bit widths). ``bayesian-bits export`` calls ``export``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..pipeline.errors import UsageError
from .loader import Loaded, load_eval_model
from .manifest import export_manifest, manifest
from .packed import export_packed, load_packed, pack
from .pruned import export_pruned, pruned_model

FORMATS: dict[str, Callable[[Loaded, str | Path], str]] = {
    "manifest": export_manifest,
    "pruned": export_pruned,
    "packed": export_packed,
}


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> str:
    """Write checkpoint ``checkpoint`` in format ``fmt`` to ``out``; returns a one-line summary."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not Path(out).parent.is_dir():
        raise UsageError(f"-o {out}: the folder {Path(out).parent} does not exist; create it or pick another path")
    loaded = load_eval_model(checkpoint)
    return FORMATS[fmt](loaded, out)


__all__ = ["FORMATS", "Loaded", "export", "export_manifest", "export_packed", "export_pruned", "load_eval_model",
           "load_packed", "manifest", "pack", "pruned_model"]

"""Checkpoints: atomic writes (temp file, fsync, rename) and the random-number-generator states they carry."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from ..finetune import convert_to_fixed
from .errors import UsageError


def rng_state() -> dict[str, Any]:
    """The torch, numpy, python and CUDA generator states of this process."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global stream other code may draw from
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then rename it over ``path``."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, flag: str) -> dict[str, Any]:
    """Load a checkpoint written by ``bayesian-bits train``; ``flag`` names the argument in error messages."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; pass a checkpoint written by bayesian-bits train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the file is not usable
        raise UsageError(f"{flag} {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "phase" not in ckpt:
        raise UsageError(f"{flag} {path}: not a bayesian-bits train checkpoint (no 'model'/'phase' entries)")
    return ckpt


def load_model_state(model: nn.Module, ckpt: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Load a checkpoint's weights into ``model`` built with its options; a fine-tuning checkpoint first restores
    the gated model, then converts it to fixed gates (as training did) before loading the fine-tuned state."""
    if ckpt["phase"] == "finetune":
        model.load_state_dict(ckpt["pre_ft_model"])
        convert_to_fixed(model)
        model.to(device)
    model.load_state_dict(ckpt["model"])

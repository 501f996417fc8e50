"""Files bayesian-bits writes and reads back: atomic writes (unique temporary name, fsync, rename, mode 0644), and
torch files of tensors and plain data that carry a SHA-256 digest of their content and load with
``weights_only=True`` (no pickled code is ever run), checked on load; train checkpoints and their weights.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .errors import CheckpointError, NonFiniteError, WriteError
from .finetune import convert_to_fixed

DIGEST_KEY = "sha256"
TEMP_SUFFIX = ".tmp"
PHASES = ("train", "finetune")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PLAIN = (bool, int, float, str, type(None))


def file_mode() -> int:
    """The mode a plainly created file gets here (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_files(folder: Path) -> list[Path]:
    """Temporary files ``write_atomic`` leaves behind in ``folder`` when its process is killed mid-write."""
    return sorted(p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file())


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.is_mount():
        path = path.parent
    return path


def write_error(path: Path, exc: OSError, size: int | None = None) -> WriteError:
    """A one-line ``WriteError`` for a failed write of ``path`` (``size`` bytes, when known)."""
    if exc.errno in _NO_SPACE:
        free = shutil.disk_usage(path.parent).free
        need = f", {size / 1e6:.1f} MB needed" if size is not None else ""
        return WriteError(f"{path}: no space left on the disk mounted at {_mount_point(path.parent)} "
                          f"({free / 1e6:.1f} MB free{need}); free some space there or write elsewhere")
    return WriteError(f"{path}: cannot write it ({exc.strerror or exc}); pick a writable folder")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any], size: int | None = None) -> None:
    """Call ``write`` on a uniquely named temporary file next to ``path``, fsync it, then rename it over ``path``.

    The temporary file is removed on any failure; an ``OSError`` (read-only folder, full disk) becomes a
    ``WriteError``. ``size``, when known, is checked against the free space first."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{path} is a folder; pass a file path")
    if size is not None and path.parent.is_dir() and shutil.disk_usage(path.parent).free < size:
        raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), size)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc, size) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc, size) from None
        raise


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` (tensors, dicts, lists, tuples and plain values) in a canonical, type-tagged encoding."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, _PLAIN):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"a {type(obj).__name__} cannot be stored in a checked file; store tensors and plain data")


def digest(obj: Any) -> str:
    """Hex SHA-256 of ``obj``'s content (tensor bytes, shapes, dtypes, keys and values, in order)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def non_finite(obj: Any, prefix: str = "") -> list[str]:
    """Key paths of the floating-point tensors and floats in ``obj`` holding NaN or infinity."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [prefix] if bad else []
    if isinstance(obj, float):
        return [] if obj == obj and abs(obj) != float("inf") else [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [name for key, value in items for name in non_finite(value, f"{prefix}.{key}" if prefix else str(key))]


def save(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` (tensors and plain data, all finite) with its digest, atomically; ``load`` reads it back."""
    bad = non_finite(obj)
    if bad:
        raise NonFiniteError(f"{path}: not written: {len(bad)} entries hold NaN or infinity ({', '.join(bad[:5])})")
    buf = io.BytesIO()
    torch.save({**obj, DIGEST_KEY: digest(obj)}, buf)
    write_atomic(path, lambda fh: fh.write(buf.getbuffer()), size=buf.tell())


# How torch's weights-only unpickler words a refused code reference (a global or a call it does not allow), from
# torch 2.4 ("Unsupported global: GLOBAL …") to 2.14 ("Trying to load unsupported GLOBAL … whose module … is
# blocked", "Trying to call reduce for unrecognized function …").
REFUSED_CODE = re.compile(r"unsupported global|reduce for unrecognized function|allowed global", re.IGNORECASE)


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line.removeprefix("WeightsUnpickler error: ") for line in lines if REFUSED_CODE.search(line)]
    return (named or lines or [type(exc).__name__])[0][:200]


def load(path: str | Path, flag: str, what: str = "a checkpoint written by bayesian-bits train") -> dict[str, Any]:
    """Read a file ``save`` wrote, with ``weights_only=True``, and check its digest; every failure is one
    ``CheckpointError`` naming ``flag`` and the file (``what`` says what was expected)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file; pass {what}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not REFUSED_CODE.search(str(exc)):  # no code reference refused: damaged, or another kind of file
            raise CheckpointError(f"{flag} {path}: not readable (damaged, or not a torch file: {_reason(exc)}); "
                                  f"pass {what}") from None
        raise CheckpointError(f"{flag} {path}: refused: it holds pickled objects other than tensors and plain data "
                              f"({_reason(exc)}); it is not {what} and was not loaded") from None
    except Exception as exc:  # a damaged archive or not a torch file at all
        raise CheckpointError(f"{flag} {path}: not readable (damaged, or not a torch file: {type(exc).__name__}: "
                              f"{_reason(exc)}); pass {what}") from None
    if not isinstance(data, dict) or DIGEST_KEY not in data:
        raise CheckpointError(f"{flag} {path}: has no content digest, so it is not {what} by this version; "
                              "write it again with this version")
    stored = data.pop(DIGEST_KEY)
    try:
        actual = digest(data)
    except TypeError:
        actual = None
    if stored != actual:
        raise CheckpointError(f"{flag} {path}: damaged: its content does not match the SHA-256 digest stored in it; "
                              "use an intact copy or another file")
    return data


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a train checkpoint (``load`` reads it, and it has a ``phase`` and a ``model``)."""
    try:
        data = load(path, "")
    except CheckpointError:
        return False
    return "model" in data and data.get("phase") in PHASES


def load_checkpoint(path: str | Path, flag: str) -> dict[str, Any]:
    """A train checkpoint: ``load`` plus its entries checked (a known ``phase``, a finite ``model`` state)."""
    ckpt = load(path, flag)
    if "model" not in ckpt or "phase" not in ckpt:
        raise CheckpointError(f"{flag} {path}: not a bayesian-bits train checkpoint (no 'model'/'phase' entries)")
    if ckpt["phase"] not in PHASES:
        raise CheckpointError(f"{flag} {path}: unknown phase {ckpt['phase']!r} (expected one of {', '.join(PHASES)})")
    bad = non_finite({"model": ckpt["model"], "pre_ft_model": ckpt.get("pre_ft_model")})
    if bad:
        raise CheckpointError(f"{flag} {path}: {len(bad)} weights hold NaN or infinity ({', '.join(bad[:5])}); "
                              "use an earlier checkpoint")
    return ckpt


def load_model_state(model: nn.Module, ckpt: dict[str, Any], source: str, device: torch.device | str = "cpu") -> None:
    """Load a checkpoint's weights into ``model`` built with its options; a fine-tuning checkpoint first restores
    the gated model, then converts it to fixed gates (as training did) before loading the fine-tuned state.
    A state that does not fit is a ``CheckpointError`` naming ``source``."""
    try:
        if ckpt["phase"] == "finetune":
            model.load_state_dict(ckpt["pre_ft_model"])
            convert_to_fixed(model)
            model.to(device)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as exc:  # a state of another model or code version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: its weights do not fit the model its options describe ({first})") from None

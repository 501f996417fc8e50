"""Just-in-time build of the C++/CUDA extensions in csrc/, cached by source and flag hash."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CACHE_ENV = "BBKERNELS_BUILD_DIR"


def build_dir(name: str, sources: list[Path], flags: list[str]) -> Path:
    """A cache folder keyed by the sources, the header, the flags and the torch version."""
    digest = hashlib.sha256()
    for path in sorted({*sources, CSRC / "bb_quant_math.h"}):
        digest.update(path.read_bytes())
    digest.update(" ".join([*flags, torch.__version__, sys.version]).encode())
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "bbkernels"))
    path = root / f"{name}-{digest.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load_extension(
    name: str, sources: tuple[str, ...], cflags: tuple[str, ...], cuda_cflags: tuple[str, ...] = ()
) -> ModuleType | None:
    """Compile (first use only, with a message) and import an extension; None with one warning on failure."""
    from torch.utils import cpp_extension

    paths = [CSRC / s for s in sources]
    directory = build_dir(name, paths, list(cflags + cuda_cflags))
    if not any(directory.glob(f"{name}*.so")):
        print(f"bbkernels: compiling {name} from csrc/ (first use only, about a minute)...", file=sys.stderr)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(p) for p in paths],
            extra_cflags=list(cflags),
            extra_cuda_cflags=list(cuda_cflags),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as err:  # any build failure means "not available"
        warnings.warn(
            f"bbkernels: could not build {name} ({type(err).__name__}: {str(err).strip()[:300]}); "
            "the operator falls back to the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


class ExtensionKernel:
    """A backend (see backends.Kernel) whose forward and backward are an extension's functions."""

    def __init__(self, load: Callable[[], ModuleType | None]) -> None:
        self._load = load

    def available(self) -> bool:
        """Whether the extension loads (building it on first call)."""
        return self._load() is not None

    def forward(self, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool,
                bits: int) -> Tensor:
        """y of x's shape and dtype."""
        return self._load().forward(x, x_max, gates, g2, signed, bits)

    def backward(self, grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None,
                 signed: bool, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(dx, dx_max[1], dgates[4], dg2[C]) in one pass over x and grad, deterministic reductions."""
        return tuple(self._load().backward(grad.to(x.dtype), x, x_max, gates, g2, signed, bits))

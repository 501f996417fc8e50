"""Just-in-time build of the C++/CUDA extensions from the package's csrc/, in a cache shared by every checkout.

A cache folder is keyed by everything that decides the binary: the sources and headers, the flags, the compiler,
torch's version and C++ ABI, the Python ABI and the CPU. The sources are copied into the folder and built there,
so nothing in the build refers to a checkout or an environment, and a folder that holds its library is never
rebuilt: two checkouts or environments either share a folder or have their own. Checking availability never
builds; the first `load` does, with a one-line message. `python -m bbkernels.build` prebuilds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import reference

CSRC = Path(__file__).resolve().parent / "csrc"
CACHE_ENV = "BBKERNELS_BUILD_DIR"
LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"
log = logging.getLogger("bbkernels")


def cache_root() -> Path:
    """$BBKERNELS_BUILD_DIR, else ~/.cache/bbkernels."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bbkernels")


def compiler() -> str:
    """The C++ compiler torch's extension builder uses."""
    return os.environ.get("CXX") or "c++"


@functools.cache
def _cpu_features() -> str:
    """The CPU's feature flags (the CPU kernel is built with -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _environment(with_cuda: bool) -> list[str]:
    """What decides the binary besides its sources and flags."""
    parts = [
        compiler(), torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.implementation.cache_tag,
        sysconfig.get_config_var("EXT_SUFFIX") or "", platform.machine(), _cpu_features(),
    ]  # fmt: skip
    if with_cuda:
        parts += [str(torch.version.cuda), os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
        if torch.cuda.is_available():  # without TORCH_CUDA_ARCH_LIST torch builds for the visible GPUs
            parts += [str(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    return parts


def cache_path(name: str, sources: Sequence[Path], flags: Sequence[str], with_cuda: bool = False) -> Path:
    """The cache folder of extension `name` built from `sources` (and csrc's headers) with `flags`."""
    digest = hashlib.sha256()
    for path in sorted({*map(Path, sources), *CSRC.glob("*.h")}, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join([name, *flags, *_environment(with_cuda)]).encode())
    return cache_root() / f"{name}-{digest.hexdigest()[:16]}"


def build_dir(name: str, sources: Sequence[Path], flags: Sequence[str], with_cuda: bool = False) -> Path:
    """`cache_path`, created."""
    path = cache_path(name, sources, flags, with_cuda)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def _which(command: str, search_path: str | None) -> str | None:
    return shutil.which(command, path=search_path)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [str(Path(home) / "bin" / "nvcc")] if home else []
    return next((c for c in [*candidates, "nvcc", "/usr/local/cuda/bin/nvcc"] if _which(c, os.environ.get("PATH"))),
                None)  # fmt: skip


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_sources(directory: Path, sources: Sequence[str]) -> list[Path]:
    """The sources and csrc's headers copied (once; the folder is keyed by their contents) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in [*(CSRC / s for s in sources), *CSRC.glob("*.h")]:
        target = directory / path.name
        if not target.exists():
            partial = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copyfile(path, partial)
            os.replace(partial, target)
    return [directory / s for s in sources]


class Extension:
    """One extension of csrc/: whether it can be used (never building), and its module (building on first use)."""

    def __init__(self, name: str, sources: tuple[str, ...], cflags: tuple[str, ...],
                 cuda_cflags: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.name, self.sources, self.cflags, self.cuda_cflags = name, sources, cflags, cuda_cflags
        self._module: ModuleType | None = None
        self._failed = False
        self._warned = False
        self._dirs: dict[tuple[str, str], Path] = {}

    def directory(self) -> Path:
        """This extension's cache folder for the current cache root and compiler."""
        key = (str(cache_root()), compiler())
        if key not in self._dirs:
            sources = [CSRC / s for s in self.sources]
            flags = [*self.cflags, *self.cuda_cflags]
            self._dirs[key] = cache_path(self.name, sources, flags, bool(self.cuda_cflags))
        return self._dirs[key]

    def library(self) -> Path:
        """Where the built library lies (or will)."""
        return self.directory() / f"{self.name}{LIB_EXT}"

    def missing_tools(self) -> list[str]:
        """The build tools not found (compiler, ninja, nvcc for CUDA sources)."""
        search_path = os.environ.get("PATH")
        missing = [tool for tool in (compiler().split()[0], "ninja") if _which(tool, search_path) is None]
        return missing + (["nvcc"] if self.cuda_cflags and _nvcc() is None else [])

    def available(self) -> bool:
        """Loaded, built in the cache, or buildable here (sources and tools present); warns once when none of these."""
        if self._module is not None:
            return True
        if self._failed:
            return False
        missing = [str(CSRC / s) for s in self.sources if not (CSRC / s).exists()]
        missing = missing or ([] if self.library().exists() else self.missing_tools())
        if missing and not self._warned:
            self._warned = True
            warnings.warn(
                f"bbkernels: {self.name} is not built and cannot be ({', '.join(missing)} not found); the operator "
                "falls back to the pure-PyTorch reference",
                RuntimeWarning,
                stacklevel=2,
            )
        return not missing

    def load(self) -> ModuleType | None:
        """The extension's module, built on first use; None with one warning when the build fails."""
        if self._module is None and not self._failed:
            try:
                self._module = self._import_or_build()
            except Exception as err:  # any build failure means "not available"
                self._failed = True
                warnings.warn(
                    f"bbkernels: could not build {self.name} ({type(err).__name__}: {str(err).strip()[:300]}); "
                    "the operator falls back to the pure-PyTorch reference",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._module

    def _import_or_build(self) -> ModuleType:
        directory, library = self.directory(), self.library()
        if library.exists():
            try:
                return _import(self.name, library)
            except ImportError:  # being linked by another process: the build below waits for it
                pass
        from torch.utils import cpp_extension

        sources = _copy_sources(directory / "src", self.sources)
        log.warning("bbkernels: compiling %s in %s (once for these sources, flags, torch and Python)",
                    self.name, directory)  # fmt: skip
        return cpp_extension.load(
            name=self.name,
            sources=[str(s) for s in sources],
            extra_cflags=list(self.cflags),
            extra_cuda_cflags=list(self.cuda_cflags),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(directory / "src")],
            build_directory=str(directory),
            verbose=False,
        )


class ExtensionKernel:
    """A backend (see backends.Kernel) whose forward and backward are an extension's; the reference if it fails."""

    def __init__(self, extension: Extension) -> None:
        self.extension = extension

    def available(self) -> bool:
        """Whether the extension is built or can be (never builds)."""
        return self.extension.available()

    def forward(self, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None, signed: bool,
                bits: int) -> Tensor:  # fmt: skip
        """y of x's shape and dtype."""
        module = self.extension.load()
        if module is None:
            return reference.forward(x, x_max, gates, g2, signed, bits)
        return module.forward(x, x_max, gates, g2, signed, bits)

    def backward(self, grad: Tensor, x: Tensor, x_max: Tensor, gates: Tensor | None, g2: Tensor | None,
                 signed: bool, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """(dx, dx_max[1], dgates[4], dg2[C]) in one pass over x and grad, deterministic reductions."""
        module = self.extension.load()
        if module is None:
            return reference.backward(grad, x, x_max, gates, g2, signed, bits)
        return tuple(module.backward(grad, x, x_max, gates, g2, signed, bits))


def main() -> int:
    """Prebuild the extensions this machine can run: the CPU kernel, and the CUDA one when a GPU is present."""
    from . import cpu, cuda

    wanted = [cpu.EXTENSION] + ([cuda.EXTENSION] if torch.cuda.is_available() else [])
    for extension in wanted:
        ready = extension.load() is not None
        print(f"{extension.name}: {'ready in ' + str(extension.directory()) if ready else 'not available'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

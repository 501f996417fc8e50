"""The JIT build: a cache keyed by what decides the binary, availability without building, the reference fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import bbkernels
from bbkernels import build, cpu, reference

PACKAGE = Path(bbkernels.__file__).resolve().parent


def _fresh_cpu_extension(monkeypatch) -> build.Extension:
    """The CPU kernel's extension with no loaded module or remembered failure, installed as the CPU backend's."""
    extension = build.Extension(cpu.EXTENSION.name, cpu.EXTENSION.sources, cpu.EXTENSION.cflags)
    monkeypatch.setattr(cpu._kernel, "extension", extension)
    return extension


def test_missing_compiler_warns_once_and_the_kernel_computes_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    extension = _fresh_cpu_extension(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"/nonexistent/c\+\+ not found.*falls back") as record:
        assert not cpu.available() and not cpu.available()
    assert len(record) == 1
    x, x_max, gates = torch.randn(5, 6), torch.tensor([2.0]), torch.tensor([0.5, 0.6, 0.0, 1.0])
    with pytest.warns(RuntimeWarning, match="could not build"):
        y = cpu.forward(x, x_max, gates, None, True, 0)
    assert extension.load() is None
    assert torch.equal(y, reference.bb_quantize(x, x_max, gates, signed=True))


def test_unavailable_kernel_degrades_to_reference(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.delenv(bbkernels.ENV_VAR, raising=False)
    assert bbkernels.resolve_backend("cpu") == "reference"
    x = torch.randn(5, 6)
    y = bbkernels.bb_quantize(x, torch.tensor(2.0), torch.ones(4), signed=True)
    assert torch.equal(y, bbkernels.reference.bb_quantize(x, torch.tensor(2.0), torch.ones(4), signed=True))
    with pytest.raises(ValueError, match="cannot run"):
        bbkernels.resolve_backend("cpu", "cpu")


def test_availability_never_builds(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(bbkernels.ENV_VAR, raising=False)
    extension = _fresh_cpu_extension(monkeypatch)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *a, **k: pytest.fail("availability built"))
    assert bbkernels.resolve_backend("cpu") == "cpu" and "cpu" in bbkernels.available_backends("cpu")
    assert not extension.directory().exists()


def test_cache_key_follows_sources_flags_and_environment_not_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    sources = [build.CSRC / "bb_quant_cpu.cpp"]
    base = build.cache_path("ext", sources, ["-O3"])
    assert base == build.cache_path("ext", sources, ["-O3"])
    assert base != build.cache_path("ext", sources, ["-O2"])
    elsewhere = tmp_path / "other-checkout" / "csrc"
    shutil.copytree(build.CSRC, elsewhere)
    monkeypatch.setattr(build, "CSRC", elsewhere)
    assert build.cache_path("ext", [elsewhere / "bb_quant_cpu.cpp"], ["-O3"]) == base
    (elsewhere / "bb_quant_math.h").write_text((elsewhere / "bb_quant_math.h").read_text() + "// edited\n")
    assert build.cache_path("ext", [elsewhere / "bb_quant_cpu.cpp"], ["-O3"]) != base
    monkeypatch.setattr(build, "CSRC", PACKAGE / "csrc")
    for module, attribute, value in ((torch, "__version__", "0.0.0"), (sys.implementation, "cache_tag", "cpython-00")):
        with monkeypatch.context() as patch:
            patch.setattr(module, attribute, value)
            assert build.cache_path("ext", sources, ["-O3"]) != base, attribute


_PROBE = textwrap.dedent(
    """
    #include <pybind11/pybind11.h>
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("checkout", [] { return "%s"; }); }
    """
)
_LOAD_PROBE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import bbkernels
    from bbkernels import build, cpu
    assert bbkernels.__file__.startswith(sys.argv[1]), bbkernels.__file__
    probe = build.Extension("bbkernels_probe", ("probe.cpp",), ("-O0",)).load()
    print(probe.checkout(), cpu.EXTENSION.directory())
    """
)


def test_two_checkouts_loaded_alternately_build_once_each(tmp_path):
    """Two copies of the package (different probe sources, the same kernel sources) share one cache."""
    env = {**os.environ, build.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    checkouts = {}
    for name in "AB":
        checkouts[name] = tmp_path / f"checkout-{name}"
        shutil.copytree(PACKAGE, checkouts[name] / "bbkernels", ignore=shutil.ignore_patterns("__pycache__"))
        (checkouts[name] / "bbkernels" / "csrc" / "probe.cpp").write_text(_PROBE % name)
    compiles, kernel_dirs = {"A": 0, "B": 0}, set()
    for name in "ABAB":
        run = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(checkouts[name])], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        loaded, kernel_dir = run.stdout.split()
        assert loaded == name
        kernel_dirs.add(kernel_dir)
        compiles[name] += run.stderr.count("bbkernels: compiling bbkernels_probe")
    assert compiles == {"A": 1, "B": 1}
    assert len(kernel_dirs) == 1, "the same kernel sources must share one cache folder"


def test_prebuild_command_reports_the_cpu_kernel():
    run = subprocess.run([sys.executable, "-m", "bbkernels.build"], capture_output=True, text=True, timeout=900,
                         cwd=PACKAGE.parent)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = "ready in" if cpu.available() else "not available"
    assert f"bbkernels_cpu: {expected}" in run.stdout

"""The JIT build: cached, and without a compiler the operator falls back to the reference with a warning."""

from __future__ import annotations

import pytest
import torch

import bbkernels
from bbkernels import build, cpu


def test_missing_compiler_warns_and_returns_none(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    with pytest.warns(RuntimeWarning, match="falls back to the pure-PyTorch reference"):
        assert build.load_extension("bbkernels_cpu_nocompiler", ("bb_quant_cpu.cpp",), cpu.CFLAGS) is None


def test_unavailable_kernel_degrades_to_reference(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.delenv(bbkernels.ENV_VAR, raising=False)
    assert bbkernels.resolve_backend("cpu") == "reference"
    x = torch.randn(5, 6)
    y = bbkernels.bb_quantize(x, torch.tensor(2.0), torch.ones(4), signed=True)
    assert torch.equal(y, bbkernels.reference.bb_quantize(x, torch.tensor(2.0), torch.ones(4), signed=True))
    with pytest.raises(ValueError, match="cannot run"):
        bbkernels.resolve_backend("cpu", "cpu")


def test_build_cache_is_keyed_by_flags(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    sources = [build.CSRC / "bb_quant_cpu.cpp"]
    a = build.build_dir("ext", sources, ["-O3"])
    assert a == build.build_dir("ext", sources, ["-O3"])
    assert a != build.build_dir("ext", sources, ["-O2"])

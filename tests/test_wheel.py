"""A normal (non-editable) install: the wheel carries the kernel sources, and the installed package runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from bbkernels import build

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = sorted(p.name for p in build.CSRC.iterdir() if p.suffix in (".cpp", ".cu", ".h"))

_CHECK = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import bbkernels
        assert bbkernels.__file__.startswith(sys.argv[1]), bbkernels.__file__
        backend = bbkernels.resolve_backend(torch.device("cpu"))
        assert backend == bbkernels.resolve_backend(torch.device("cpu"))
        x, x_max, g2 = torch.randn(16, 3, 5, 5), torch.tensor(1.7), torch.rand(16)
        gates = torch.tensor([0.9, 0.6, 0.0, 1.0])
        y = bbkernels.bb_quantize(x, x_max, gates, g2, signed=True)
        assert torch.equal(y, bbkernels.reference.bb_quantize(x, x_max, gates, g2, signed=True))
    ours = [str(w.message) for w in caught if "bbkernels" in str(w.message)]
    print(backend, len(ours))
    """
)


def _run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    run = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The wheel and the sdist, built from a copy of the project (the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("dist")
    project = tmp / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("bbkernels", "bayesian_bits"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    out = tmp / "out"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out,
         project)  # fmt: skip
    _run(sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})", cwd=project)
    return out


def test_wheel_and_sdist_carry_the_kernel_sources(dist):
    wheel = zipfile.ZipFile(next(dist.glob("*.whl"))).namelist()
    sdist = tarfile.open(next(dist.glob("*.tar.gz"))).getnames()
    for name in KERNEL_SOURCES:
        assert f"bbkernels/csrc/{name}" in wheel
        assert any(n.endswith(f"/bbkernels/csrc/{name}") for n in sdist), name


def test_installed_wheel_runs_the_cpu_kernel_from_outside_the_checkout(dist, tmp_path):
    env_dir = tmp_path / "env"
    _run(sys.executable, "-m", "venv", "--without-pip", env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "installed_torch.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")  # reuse torch
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
         next(dist.glob("*.whl")))  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BBKERNELS_BACKEND")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    run = _run(python, "-c", _CHECK, site, cwd=elsewhere, env=env)
    assert run.stdout.split() == ["cpu", "0"], run.stdout + run.stderr[-2000:]
    # No compiler and nothing built: one warning, then the reference.
    env.update(CXX=str(tmp_path / "no-compiler"), **{build.CACHE_ENV: str(tmp_path / "empty-cache")})
    run = _run(python, "-c", _CHECK, site, cwd=elsewhere, env=env)
    assert run.stdout.split() == ["reference", "1"], run.stdout + run.stderr[-2000:]

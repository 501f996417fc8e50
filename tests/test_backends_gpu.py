"""GPU backends without a GPU: compile checks (nvcc, Triton → PTX), dispatch, Triton-specific numerics.

On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) on small
CPU tensors; the compiled path is checked by compiling for sm_80/sm_90 and reading the PTX. On a GPU
machine the same numerics tests run on the device.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bbkernels
from bbkernels import cuda as cuda_backend
from bbkernels import reference
from bbkernels.build import CSRC, build_dir

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = bbkernels.is_available("triton", DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1 (see conftest.py)")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _ptx_instruction_counts(ptx: str) -> dict[str, int]:
    return {
        "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "div_rn": len(re.findall(r"\bdiv\.rn\.f32\b", ptx)),
        "div_approx": len(re.findall(r"\bdiv\.(?:approx|full)\.f32\b", ptx)),
        "rint": len(re.findall(r"\bcvt\.rni\.f32\.f32\b", ptx)),
    }


def _assert_exact_ptx(counts: dict[str, int], what: str) -> None:
    assert counts["fma"] == 0, f"{what}: FMA contraction in the PTX"
    assert counts["div_approx"] == 0, f"{what}: approximate division in the PTX"
    assert counts["div_rn"] > 0 and counts["rint"] > 0, f"{what}: expected div.rn.f32 and cvt.rni.f32: {counts}"


def test_cuda_source_compiles_for_sm80_and_sm90():
    """nvcc -c of csrc/bb_quant_cuda.cu with the extension's flags; the PTX has no FMA and IEEE division.

    About a minute on two cores; the result is cached under the build cache by source and flag hash.
    """
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or $CUDA_HOME/bin): cannot compile-check the CUDA kernels")
    sources = [CSRC / s for s in cuda_backend.SOURCES] + [CSRC / "bb_quant_cuda.h"]
    flags = cuda_backend.nvcc_compile_command(nvcc, (80, 90), "out.o")
    cache = build_dir("nvcc_check", sources, flags)
    stamp = cache / "ok.json"
    if not stamp.exists():
        keep = cache / "intermediate"
        keep.mkdir(exist_ok=True)
        command = cuda_backend.nvcc_compile_command(nvcc, (80, 90), str(cache / "bb_quant_cuda.o"))
        result = subprocess.run([*command, "--threads=2", "-keep", f"-keep-dir={keep}"], capture_output=True, text=True)
        assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
        ptx = "\n".join(p.read_text() for p in sorted(keep.glob("*.ptx")))
        assert ptx.count(".target sm_80") and ptx.count(".target sm_90"), "expected PTX for sm_80 and sm_90"
        stamp.write_text(json.dumps(_ptx_instruction_counts(ptx)))
    _assert_exact_ptx(json.loads(stamp.read_text()), "CUDA kernels")


_TRITON_PTX_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bbkernels import triton_kernels as T

    def ptx(fn, signature, constants, arch):
        signature = dict(signature, **{k: "constexpr" for k in constants})
        src = ASTSource(fn=fn, signature=signature, constexprs=constants)
        opts = dict(num_warps=8, enable_fp_fusion=False)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts).asm["ptx"]

    scalars = {"x_max_ptr": "*fp32", "gates_ptr": "*fp32", "g2_ptr": "*fp32", "inner": "i32",
               "tiles_per_channel": "i32"}
    out = {}
    for arch, dtype, gated in ((80, "fp32", True), (90, "fp32", True), (90, "bf16", False)):
        meta = dict(SIGNED=True, FIRST=0 if gated else 2, GATED=gated, HAS_G2=True, BLOCK=1024, ITERS=2,
                    INTERPRET=False)
        fwd = dict(x_ptr=f"*{dtype}", y_ptr=f"*{dtype}", **scalars)
        bwd = dict(grad_ptr=f"*{dtype}", x_ptr=f"*{dtype}", dx_ptr=f"*{dtype}", part_ptr="*fp64", **scalars)
        out[f"forward-sm{arch}-{dtype}"] = ptx(T._forward_kernel, fwd, meta, arch)
        out[f"backward-sm{arch}-{dtype}"] = ptx(T._backward_kernel, bwd, meta, arch)
    fin = {"part_ptr": "*fp64", "dxm_ptr": "*fp32", "dgates_ptr": "*fp32", "dg2_ptr": "*fp32",
           "channels": "i32", "tiles_per_channel": "i32"}
    ptx(T._finish_kernel, fin, {"CB": 8, "TB": 128}, 90)
    json.dump(out, sys.stdout)
    """
)


def test_triton_kernels_compile_to_exact_ptx_for_sm80_and_sm90():
    """The compiled (not interpreted) Triton kernels: no FMA, div.rn.f32, cvt.rni (round half to even)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_PTX_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("Triton's ptxas is missing")
    assert result.returncode == 0, result.stderr[-4000:]
    for name, ptx in json.loads(result.stdout).items():
        _assert_exact_ptx(_ptx_instruction_counts(ptx), f"Triton {name}")


# --- dispatch ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without a GPU")
def test_cuda_backend_unavailable_without_gpu():
    assert not cuda_backend.available()
    assert not bbkernels.is_available("cuda", "cpu")
    assert "cuda" not in bbkernels.available_backends("cpu")
    with pytest.raises(ValueError, match="'cuda'"):
        bbkernels.resolve_backend("cpu", "cuda")


def test_forcing_an_impossible_backend_names_it(monkeypatch):
    x, x_max, gates = torch.randn(4, 3), torch.tensor(1.0), torch.ones(4)
    monkeypatch.setenv(bbkernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        bbkernels.bb_quantize(x, x_max, gates, signed=True)
    monkeypatch.delenv(bbkernels.ENV_VAR)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"'triton'.*TRITON_INTERPRET"):
        bbkernels.fixed_quantize(x, x_max, 8, signed=True, backend="triton")


def test_resolve_backend_reports_the_choice(monkeypatch):
    monkeypatch.delenv(bbkernels.ENV_VAR, raising=False)
    if torch.cuda.is_available():
        expected = "triton" if bbkernels.is_available("triton", "cuda") else "cuda"
        assert bbkernels.resolve_backend("cuda") == expected
        assert bbkernels.resolve_backend("cuda", "cuda") == "cuda"
    monkeypatch.setenv(bbkernels.ENV_VAR, "reference")
    assert bbkernels.resolve_backend(DEVICE) == "reference"
    if TRITON_OK:
        monkeypatch.setenv(bbkernels.ENV_VAR, "triton")
        assert bbkernels.resolve_backend(DEVICE) == "triton"
        assert "triton" in bbkernels.available_backends(DEVICE)


# --- Triton numerics (interpreter on CPU, the device on GPU machines) --------------------------------


def _triton():
    from bbkernels import triton_kernels

    return triton_kernels


def _grads(backward, grad, x, x_max, gates, g2, signed, bits=0):
    return [t.cpu() for t in backward(grad, x, x_max, gates, g2, signed, bits)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_rounds_ties_to_even_and_casts_to_nearest_even(dtype):
    """Values on exact half-steps of every level and on the clip bounds: bit-exact with the reference."""
    T = _triton()
    x_max = torch.tensor([1.5], device=DEVICE)
    s2 = (x_max * 2) / 3
    steps = torch.arange(-12, 13, device=DEVICE, dtype=torch.float32)
    ties = torch.cat([(steps + 0.5) * s2 / d for d in (1, 5, 85)] + [torch.tensor([1.5, -1.5, 0.0], device=DEVICE)])
    x = torch.cat([ties, torch.randn(200, device=DEVICE)]).to(dtype).reshape(1, -1)
    for gates in ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]):
        g = torch.tensor(gates, device=DEVICE)
        y = T.forward(x, x_max, g, None, True, 0)
        assert torch.equal(y.cpu(), reference.bb_quantize(x.cpu(), x_max.cpu(), g.cpu(), signed=True))


@needs_triton
def test_triton_multi_tile_channels_and_loops(monkeypatch):
    """Small forced tiles: several tiles per channel, several loop steps per tile, ragged last tiles."""
    T = _triton()
    monkeypatch.setattr(T, "layout", lambda numel, channels: (numel // channels, 32, 3, -(-numel // channels // 96), 1))
    torch.manual_seed(0)
    for signed, bits, gates in ((True, 0, [0.8, 0.6, 0.0, 1.0]), (False, 0, [1.0, 1.0, 1.0, 1.0]), (True, 8, None)):
        x = torch.randn(5, 250, device=DEVICE) * 1.4
        x_max = torch.tensor([1.2], device=DEVICE)
        g = None if gates is None else torch.tensor(gates, device=DEVICE)
        g2 = torch.tensor([0.3, 0.0, 1.0, 0.7, 0.9], device=DEVICE)
        grad = torch.randn_like(x)
        if bits:
            y_ref = reference.fixed_quantize(x.cpu(), x_max.cpu(), bits, g2.cpu(), signed=signed)
        else:
            y_ref = reference.bb_quantize(x.cpu(), x_max.cpu(), g.cpu(), g2.cpu(), signed=signed)
        assert torch.equal(T.forward(x, x_max, g, g2, signed, bits).cpu(), y_ref)
        got = _grads(T.backward, grad, x, x_max, g, g2, signed, bits)
        # fp32 closed form: the same rounding decisions (fp64 flips ties such as clipped values at 8 bit)
        gates_cpu = None if g is None else g.cpu()
        args = (grad.cpu(), x.cpu(), x_max.cpu(), gates_cpu, g2.cpu())
        want = reference.closed_form_grads(*args, signed=signed, bits=bits, compute_dtype=torch.float32)
        for name, a, b in zip(("dx", "dx_max", "dgates", "dg2"), got, want, strict=True):
            torch.testing.assert_close(a.double().reshape(-1), b.double().reshape(-1), rtol=1e-5, atol=1e-5, msg=name)
        first_zero = 0 if gates is None else next((i for i, v in enumerate(gates) if v == 0), 4)
        assert torch.all(got[2][first_zero:] == 0), "gates at/above the first zero (all, fixed-bit) get 0"
        again = _grads(T.backward, grad, x, x_max, g, g2, signed, bits)
        assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True)), "backward must be deterministic"


@needs_triton
def test_triton_dead_gate_gradients_are_exactly_zero_even_with_inf_grad():
    T = _triton()
    x = torch.randn(3, 40, device=DEVICE)
    grad = torch.randn_like(x)
    grad[0, 0] = float("inf")
    gates = torch.tensor([0.5, 0.0, 1.0, 1.0], device=DEVICE)
    _, _, dgates, _ = _grads(T.backward, grad, x, torch.tensor([1.0], device=DEVICE), gates, None, True)
    assert torch.equal(dgates[1:], torch.zeros(3))


@needs_triton
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_triton_invalid_x_max_gives_nan_everywhere(bad):
    """Kernels do not read x_max on the host: a bad value poisons every output instead."""
    T = _triton()
    x = torch.randn(2, 30, device=DEVICE)
    x_max, gates = torch.tensor([bad], device=DEVICE), torch.ones(4, device=DEVICE)
    assert torch.isnan(T.forward(x, x_max, gates, None, False, 0)).all()
    _, dxm, _, dg2 = T.backward(torch.ones_like(x), x, x_max, gates, None, False, 0)
    assert torch.isnan(dxm).all() and torch.isnan(dg2).all()


def test_triton_layout_tiles_stay_inside_channels():
    """Tiles never straddle a channel, cover it, and launch counts stay modest for large tensors."""
    pytest.importorskip("triton")
    from bbkernels.triton_kernels import layout

    for numel, channels in ((1 << 13, 1), (1 << 21, 1), (1 << 26, 1), (64 * 3 * 49, 64), (1000 * 512, 1000), (5, 5)):
        inner, block, iters, tiles_per_channel, warps = layout(numel, channels)
        tile = block * iters
        assert inner * channels == numel and (tiles_per_channel - 1) * tile < inner <= tiles_per_channel * tile
        assert block & (block - 1) == 0 and block // 32 >= warps >= 1
        assert channels * tiles_per_channel <= max(8192, channels)

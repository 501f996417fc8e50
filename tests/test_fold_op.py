"""The fused exact BatchNorm fold (`bbkernels::fold_bn`): every backend against a float64 autograd evaluation of
SPEC B §4.3 (error at most twice the fp32 reference's, after flash-attention's rule), the op's registrations, its
contract, and the Triton kernels compiled for a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bbkernels import cpu_fold, fold_reference, fold_triton
from bbkernels.fold_ops import fold_bn

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"reference": fold_reference, "cpu": cpu_fold, "triton": fold_triton}
SHAPES = [(4, 3, 5, 5), (6, 7), (2, 16, 3), (3, 2, 40, 41)]  # conv, linear (BN1d), conv1d, more than a chunk
CLAMPS = [None, float("inf"), 6.0]  # none, ReLU, ReLU6


def _inputs(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    res = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    y = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    gamma = torch.randn(c, generator=gen, dtype=torch.float64)
    beta = torch.randn(c, generator=gen, dtype=torch.float64) + 2  # some outputs above the ReLU6 cap
    std_run = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return [res, y, gamma, beta, std_run]


def _float64_truth(inputs: list[torch.Tensor], clamp: float | None, probe: torch.Tensor) -> list[torch.Tensor]:
    """[out, ∂/∂res, ∂/∂y, ∂/∂γ, ∂/∂β] of Σ probe·out by autograd in float64, straight from §4.3."""
    res, y, gamma, beta = (t.clone().requires_grad_() for t in inputs[:4])
    std_run = inputs[4]
    dims = [d for d in range(y.dim()) if d != 1]
    per_channel = lambda v: fold_reference.per_channel(v, y.dim())  # noqa: E731
    mean = y.mean(dims)
    std = torch.sqrt(((y - per_channel(mean)) ** 2).mean(dims) + 1e-5)
    out = res * per_channel(std_run / std) + per_channel(beta - gamma * mean / std)
    if clamp is not None:
        out = out.clamp(0.0, None if clamp == float("inf") else clamp)
    (out * probe).sum().backward()
    return [out.detach(), res.grad, y.grad, gamma.grad, beta.grad]


def _run(kernel, inputs: list[torch.Tensor], clamp: float | None, probe: torch.Tensor) -> list[torch.Tensor]:
    f32 = [t.float() for t in inputs]
    out, mean, _, std = kernel.forward(*f32, 1e-5, clamp)
    grads = kernel.backward(probe.float(), f32[1], out, *f32[2:], mean, std, clamp)
    return [out, *grads]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clamp", CLAMPS)
def test_every_backend_within_twice_the_reference_error(shape, clamp) -> None:
    inputs = _inputs(shape, seed=len(shape) + (0 if clamp is None else int(min(clamp, 9))))
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    truth = _float64_truth(inputs, clamp, probe)
    reference = _run(fold_reference, inputs, clamp, probe)
    names = ["out", "d_res", "d_y", "d_gamma", "d_beta"]
    for name, kernel in BACKENDS.items():
        got = _run(kernel, inputs, clamp, probe)
        for what, g, r, t in zip(names, got, reference, truth, strict=True):
            assert torch.isfinite(g).all(), (name, what)
            scale = float(t.abs().max()) + 1e-30
            ref_err = float((r.double() - t).abs().max()) / scale
            err = float((g.double() - t).abs().max()) / scale
            assert err <= 2 * ref_err + 2e-7, f"{name} {what}: error {err:.2e} against the reference's {ref_err:.2e}"


def test_statistics_of_the_running_average() -> None:
    res, y, gamma, beta, std_run = (t.float() for t in _inputs((8, 4, 3, 3), seed=1))
    for kernel in BACKENDS.values():
        _, mean, var, std = kernel.forward(res, y, gamma, beta, std_run, 1e-5, None)
        torch.testing.assert_close(mean, y.mean((0, 2, 3)))
        torch.testing.assert_close(var, y.var((0, 2, 3), correction=1))  # the running statistics' unbiased variance
        torch.testing.assert_close(std, torch.sqrt(y.var((0, 2, 3), correction=0) + 1e-5))


def test_op_registrations() -> None:
    inputs = [t.float() for t in _inputs((4, 3, 5, 5), seed=2)]
    for t in inputs[:4]:
        t.requires_grad_()
    torch.library.opcheck(fold_bn, (*inputs, 1e-5, float("inf")))
    out, *_ = fold_bn(*inputs, 1e-5, float("inf"))
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs[:4])


def test_contract_errors_name_the_argument() -> None:
    res, y, gamma, beta, std_run = (t.float() for t in _inputs((4, 3, 5, 5), seed=3))
    with pytest.raises(ValueError, match="one shape"):
        fold_bn(res[:2], y, gamma, beta, std_run, 1e-5, None)
    with pytest.raises(ValueError, match="more than one value per channel"):
        fold_bn(res[:1, :, :1, :1], y[:1, :, :1, :1], gamma, beta, std_run, 1e-5, None)
    with pytest.raises(ValueError, match="gamma must be fp32 with one entry per channel"):
        fold_bn(res, y, gamma[:2], beta, std_run, 1e-5, None)
    with pytest.raises(ValueError, match="clamp_max must be positive"):
        fold_bn(res, y, gamma, beta, std_run, 1e-5, -1.0)


_PTX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bbkernels import fold_triton as F

    def ptx(fn, signature, constants):
        signature = dict(signature, **{k: "constexpr" for k in constants})
        src = ASTSource(fn=fn, signature=signature, constexprs=constants)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]

    i32, f32, f64, x = "i32", "*fp32", "*fp64", "*bf16"
    clamp = {"HAS_CLAMP": True, "HI": 6.0}
    out = {
        "stats": ptx(F._stats_partials, dict(y_ptr=x, part_ptr=f64, C=i32, inner=i32, total=i32, chunk=i32,
                                              n_chunks=i32), {"BLOCK": 1024}),
        "stats_finish": ptx(F._stats_finish, dict(y_ptr=x, part_ptr=f64, gamma_ptr=f32, beta_ptr=f32,
                                                   std_run_ptr=f32, mean_ptr=f32, var_ptr=f32, std_ptr=f32,
                                                   ab_ptr=f32, C=i32, inner=i32, total=i32, n_chunks=i32,
                                                   eps="fp32"), {}),
        "affine": ptx(F._affine, dict(res_ptr=x, out_ptr=x, ab_ptr=f32, C=i32, inner=i32, numel=i32),
                      {"BLOCK": 1024, **clamp}),
        "grad": ptx(F._grad_partials, dict(grad_ptr=x, out_ptr=x, part_ptr=f64, C=i32, inner=i32, total=i32,
                                            chunk=i32, n_chunks=i32), {"BLOCK": 1024, **clamp}),
        "grad_finish": ptx(F._grad_finish, dict(part_ptr=f64, gamma_ptr=f32, beta_ptr=f32, std_run_ptr=f32,
                                                 mean_ptr=f32, std_ptr=f32, coef_ptr=f32, dgamma_ptr=f32,
                                                 dbeta_ptr=f32, total=i32, n_chunks=i32), {}),
        "grad_elementwise": ptx(F._grad_elementwise, dict(grad_ptr=x, out_ptr=x, y_ptr=x, coef_ptr=f32, dres_ptr=x,
                                                           dy_ptr=x, C=i32, inner=i32, numel=i32),
                                {"BLOCK": 1024, **clamp}),
    }
    json.dump({k: len(v) for k, v in out.items()}, sys.stdout)
    """
)


def test_triton_fold_kernels_compile_for_sm90() -> None:
    """The compiled (not interpreted) kernels: each gives PTX for sm_90."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("Triton's ptxas is missing")
    assert result.returncode == 0, result.stderr[-4000:]
    assert all(size > 0 for size in json.loads(result.stdout).values())

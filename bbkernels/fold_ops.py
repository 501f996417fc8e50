"""The exact BatchNorm fold of training as torch.library custom ops, with a kernel per device (as ops.py does for
the quantize-and-gate operator): `bbkernels::fold_bn(res, y, gamma, beta, std_run, eps, clamp_max)` →
(out, mean, var, std) and its backward `bbkernels::fold_bn_backward`.

Kernels, by the backend `backends.resolve_backend` names for the tensors' device: `cpu` the C++ kernel of
csrc/bn_fold_cpu.cpp, `triton` the kernels of fold_triton.py, `cuda` (no C++ kernel of its own) and `reference` the
PyTorch oracle of fold_reference.py. Every implementation checks the contract first (`check`); the fake ones give
torch.compile the output shapes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from . import fold_reference
from .backends import resolve_backend

# Where each backend's fold kernels live (their `forward` / `backward` take fold_reference's arguments).
_MODULES = {"reference": "bbkernels.fold_reference", "cpu": "bbkernels.cpu_fold", "triton": "bbkernels.fold_triton",
            "cuda": "bbkernels.fold_reference"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel(device: torch.device) -> ModuleType:
    return importlib.import_module(_MODULES[resolve_backend(device)])


def check(res: Tensor, y: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, clamp_max: float | None) -> None:
    """The fold's contract: `res` and `y` of one floating shape (N, C, ...) with N·(rest) > 1 values per channel,
    fp32 channel vectors of C entries, all on one device; `clamp_max` None, inf (ReLU) or positive (ReLU6: 6)."""
    torch._check_value(res.shape == y.shape, lambda: f"res {tuple(res.shape)} and y {tuple(y.shape)} must have "
                                                     "one shape: the same layer's output with two weights")
    torch._check_value(y.dim() >= 2, lambda: f"y must be (N, C, ...), got shape {tuple(y.shape)}")
    torch._check_type(res.dtype in FLOAT_DTYPES and y.dtype == res.dtype,
                      lambda: f"res and y must share a float dtype (fp32, fp16, bf16), got {res.dtype}, {y.dtype}")
    channels = y.shape[1]
    torch._check_value(y.numel() // max(channels, 1) > 1, lambda: "the batch statistics need more than one value "
                       f"per channel (train with batch > 1), got shape {tuple(y.shape)}")
    for name, v in (("gamma", gamma), ("beta", beta), ("std_run", std_run)):
        torch._check_value(v.dim() == 1 and v.shape[0] == channels and v.dtype == torch.float32,
                           lambda name=name, v=v: f"{name} must be fp32 with one entry per channel ({channels}), "
                           f"got {v.dtype} {tuple(v.shape)}")
    for name, v in (("y", y), ("gamma", gamma), ("beta", beta), ("std_run", std_run)):
        torch._check_value(v.device == res.device,
                           lambda name=name, v=v: f"{name} is on {v.device} but res is on {res.device}")
    torch._check_value(clamp_max is None or clamp_max > 0, lambda: f"clamp_max must be positive, got {clamp_max}")


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


@torch.library.custom_op("bbkernels::fold_bn", mutates_args=())
def fold_bn(res: Tensor, y: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, eps: float,
            clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, μ_B, unbiased var, σ_B); this body is the default implementation (the reference)."""
    check(res, y, gamma, beta, std_run, clamp_max)
    return fold_reference.forward(*_contiguous(res, y, gamma, beta, std_run), eps, clamp_max)


@fold_bn.register_kernel(("cpu", "cuda"))
def _(res, y, gamma, beta, std_run, eps, clamp_max):
    check(res, y, gamma, beta, std_run, clamp_max)
    return _kernel(res.device).forward(*_contiguous(res, y, gamma, beta, std_run), eps, clamp_max)


@fold_bn.register_fake
def _(res, y, gamma, beta, std_run, eps, clamp_max):
    check(res, y, gamma, beta, std_run, clamp_max)
    vector = gamma.new_empty(y.shape[1])
    return torch.empty_like(res, memory_format=torch.contiguous_format), vector, vector.clone(), vector.clone()


@torch.library.custom_op("bbkernels::fold_bn_backward", mutates_args=())
def fold_bn_backward(grad: Tensor, y: Tensor, out: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, mean: Tensor,
                     std: Tensor, clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(∂L/∂res, ∂L/∂y, ∂L/∂γ, ∂L/∂β); this body is the default implementation (the reference)."""
    check(out, y, gamma, beta, std_run, clamp_max)
    return fold_reference.backward(*_contiguous(grad, y, out, gamma, beta, std_run, mean, std), clamp_max)


@fold_bn_backward.register_kernel(("cpu", "cuda"))
def _(grad, y, out, gamma, beta, std_run, mean, std, clamp_max):
    check(out, y, gamma, beta, std_run, clamp_max)
    return _kernel(out.device).backward(*_contiguous(grad.to(out.dtype), y, out, gamma, beta, std_run, mean, std),
                                        clamp_max)


@fold_bn_backward.register_fake
def _(grad, y, out, gamma, beta, std_run, mean, std, clamp_max):
    check(out, y, gamma, beta, std_run, clamp_max)
    vector = gamma.new_empty(y.shape[1])
    return (torch.empty_like(out, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format), vector, vector.clone())


def _setup_context(ctx, inputs, output) -> None:
    _, y, gamma, beta, std_run, _, clamp_max = inputs
    out, mean, var, std = output
    ctx.save_for_backward(y, out, gamma, beta, std_run, mean, std)
    ctx.clamp_max = clamp_max
    ctx.mark_non_differentiable(mean, var, std)
    ctx.set_materialize_grads(False)  # the statistics' (absent) gradients stay None, not three zero fills


def _backward(ctx, grad: Tensor, _mean, _var, _std):
    y, out, gamma, beta, std_run, mean, std = ctx.saved_tensors
    d_res, d_y, d_gamma, d_beta = fold_bn_backward(grad, y, out, gamma, beta, std_run, mean, std, ctx.clamp_max)
    return d_res, d_y, d_gamma, d_beta, None, None, None


fold_bn.register_autograd(_backward, setup_context=_setup_context)

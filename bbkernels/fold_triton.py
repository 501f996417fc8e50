"""Triton kernels of the exact BatchNorm fold of training (oracle: fold_reference.py), three launches each way.

Forward: per (channel, chunk) the fp64 sums of y − shift and its square (shift = the channel's first value, so the
variance does not cancel); one program per channel then combines its chunks in a fixed order into μ_B, the
variances, σ_B and the output's a = σ_run/σ_B, b = β − γ·μ_B/σ_B; an elementwise pass writes act(res·a + b).
Backward: per (channel, chunk) the fp64 sums of g and g·out (g masked by the activation); per channel the
coefficients; an elementwise pass writes ∂L/∂res = g·a and ∂L/∂y = y·k1 + k0. No atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_kernels import INTERPRETED, _on

BLOCK = 1024  # elements per step of a program
CHUNK_PROGRAMS = 512  # about this many (channel, chunk) programs for the reductions


@triton.jit
def _offsets(c, j, C, inner):
    # element j (of N·inner) of channel c in an (N, C, inner) tensor
    return (j // inner) * C * inner + c * inner + j % inner


@triton.jit
def _stats_partials(y_ptr, part_ptr, C, inner, total, chunk, n_chunks, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1)
    shift = tl.load(y_ptr + c * inner).to(tl.float64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    acc2 = tl.zeros([BLOCK], dtype=tl.float64)
    start = k * chunk
    for off in range(start, start + chunk, BLOCK):
        j = off + tl.arange(0, BLOCK)
        mask = j < total
        v = tl.load(y_ptr + _offsets(c, j, C, inner), mask=mask, other=0.0).to(tl.float64)
        d = tl.where(mask, v - shift, 0.0)
        acc += d
        acc2 += d * d
    tl.store(part_ptr + (c * n_chunks + k) * 2, tl.sum(acc, 0))
    tl.store(part_ptr + (c * n_chunks + k) * 2 + 1, tl.sum(acc2, 0))


@triton.jit
def _stats_finish(y_ptr, part_ptr, gamma_ptr, beta_ptr, std_run_ptr, mean_ptr, var_ptr, std_ptr, ab_ptr, C, inner,
                  total, n_chunks, eps):
    c = tl.program_id(0)
    s = tl.zeros([1], dtype=tl.float64)
    s2 = tl.zeros([1], dtype=tl.float64)
    for k in range(0, n_chunks):  # a fixed order
        s += tl.load(part_ptr + (c * n_chunks + k) * 2 + tl.arange(0, 1))
        s2 += tl.load(part_ptr + (c * n_chunks + k) * 2 + 1 + tl.arange(0, 1))
    m = total.to(tl.float64)
    shift = tl.load(y_ptr + c * inner + tl.arange(0, 1)).to(tl.float64)
    dm = s / m
    biased = tl.maximum(s2 / m - dm * dm, 0.0)
    mean = (shift + dm).to(tl.float32)
    std = tl.sqrt((biased + eps).to(tl.float32))
    gamma = tl.load(gamma_ptr + c + tl.arange(0, 1))
    beta = tl.load(beta_ptr + c + tl.arange(0, 1))
    std_run = tl.load(std_run_ptr + c + tl.arange(0, 1))
    idx = c + tl.arange(0, 1)
    tl.store(mean_ptr + idx, mean)
    tl.store(var_ptr + idx, (biased * m / tl.maximum(m - 1.0, 1.0)).to(tl.float32))
    tl.store(std_ptr + idx, std)
    tl.store(ab_ptr + 2 * c + tl.arange(0, 1), std_run / std)
    tl.store(ab_ptr + 2 * c + 1 + tl.arange(0, 1), beta - gamma * mean / std)


@triton.jit
def _clamp(v, HAS_CLAMP: tl.constexpr, HI: tl.constexpr):
    if HAS_CLAMP:
        v = tl.where(v < 0.0, 0.0, v)
        v = tl.where(v > HI, HI, v)
    return v


@triton.jit
def _masked(g, out, HAS_CLAMP: tl.constexpr, HI: tl.constexpr):
    # the gradient where the activation passes it (strictly inside its range)
    if HAS_CLAMP:
        g = tl.where((out > 0.0) & (out < HI), g, 0.0)
    return g


@triton.jit
def _affine(res_ptr, out_ptr, ab_ptr, C, inner, numel, BLOCK: tl.constexpr, HAS_CLAMP: tl.constexpr,
            HI: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = (i // inner) % C
    a = tl.load(ab_ptr + 2 * c, mask=mask, other=0.0)
    b = tl.load(ab_ptr + 2 * c + 1, mask=mask, other=0.0)
    x = tl.load(res_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, _clamp(x * a + b, HAS_CLAMP, HI).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_partials(grad_ptr, out_ptr, part_ptr, C, inner, total, chunk, n_chunks, BLOCK: tl.constexpr,
                   HAS_CLAMP: tl.constexpr, HI: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    acc2 = tl.zeros([BLOCK], dtype=tl.float64)
    start = k * chunk
    for off in range(start, start + chunk, BLOCK):
        j = off + tl.arange(0, BLOCK)
        mask = j < total
        offs = _offsets(c, j, C, inner)
        out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _masked(g, out, HAS_CLAMP, HI).to(tl.float64)
        acc += g
        acc2 += g * out.to(tl.float64)
    tl.store(part_ptr + (c * n_chunks + k) * 2, tl.sum(acc, 0))
    tl.store(part_ptr + (c * n_chunks + k) * 2 + 1, tl.sum(acc2, 0))


@triton.jit
def _grad_finish(part_ptr, gamma_ptr, beta_ptr, std_run_ptr, mean_ptr, std_ptr, coef_ptr, dgamma_ptr, dbeta_ptr,
                 total, n_chunks):
    c = tl.program_id(0)
    s1 = tl.zeros([1], dtype=tl.float64)
    s_out = tl.zeros([1], dtype=tl.float64)
    for k in range(0, n_chunks):  # a fixed order
        s1 += tl.load(part_ptr + (c * n_chunks + k) * 2 + tl.arange(0, 1))
        s_out += tl.load(part_ptr + (c * n_chunks + k) * 2 + 1 + tl.arange(0, 1))
    idx = c + tl.arange(0, 1)
    gamma = tl.load(gamma_ptr + idx).to(tl.float64)
    beta = tl.load(beta_ptr + idx).to(tl.float64)
    std_run = tl.load(std_run_ptr + idx).to(tl.float64)
    mean = tl.load(mean_ptr + idx).to(tl.float64)
    std = tl.load(std_ptr + idx).to(tl.float64)
    m = total.to(tl.float64)
    a = std_run / std
    b = beta - gamma * mean / std
    s2 = (s_out - b * s1) / a  # Σ g·res
    d_mean = -gamma * s1 / std
    d_std = (gamma * mean * s1 - std_run * s2) / (std * std)
    k1 = d_std / (std * m)
    k0 = d_mean / m - k1 * mean
    tl.store(coef_ptr + 3 * c + tl.arange(0, 1), a.to(tl.float32))
    tl.store(coef_ptr + 3 * c + 1 + tl.arange(0, 1), k1.to(tl.float32))
    tl.store(coef_ptr + 3 * c + 2 + tl.arange(0, 1), k0.to(tl.float32))
    tl.store(dgamma_ptr + idx, (-s1 * mean / std).to(tl.float32))
    tl.store(dbeta_ptr + idx, s1.to(tl.float32))


@triton.jit
def _grad_elementwise(grad_ptr, out_ptr, y_ptr, coef_ptr, dres_ptr, dy_ptr, C, inner, numel, BLOCK: tl.constexpr,
                      HAS_CLAMP: tl.constexpr, HI: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = (i // inner) % C
    a = tl.load(coef_ptr + 3 * c, mask=mask, other=0.0)
    k1 = tl.load(coef_ptr + 3 * c + 1, mask=mask, other=0.0)
    k0 = tl.load(coef_ptr + 3 * c + 2, mask=mask, other=0.0)
    out = tl.load(out_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = _masked(g, out, HAS_CLAMP, HI)
    y = tl.load(y_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(dres_ptr + i, (g * a).to(dres_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + i, (y * k1 + k0).to(dy_ptr.dtype.element_ty), mask=mask)


def available() -> bool:
    """CUDA is present, or the kernels run in Triton's interpreter (CPU tensors, for tests)."""
    return torch.cuda.is_available() or INTERPRETED


def _layout(y: Tensor) -> tuple[int, int, int, int, int]:
    """(C, inner, per-channel total, chunk, chunks): a chunk is a multiple of BLOCK elements of one channel."""
    channels = y.shape[1]
    total = y.numel() // channels
    inner = total // y.shape[0]
    blocks = -(-total // BLOCK)
    chunks = max(1, min(blocks, CHUNK_PROGRAMS // max(channels, 1)))
    chunk = BLOCK * -(-blocks // chunks)
    return channels, inner, total, chunk, -(-total // chunk)


def _clamp_meta(clamp_max: float | None) -> dict:
    return dict(HAS_CLAMP=clamp_max is not None, HI=float("inf") if clamp_max is None else float(clamp_max))


def forward(res: Tensor, y: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, eps: float,
            clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, μ_B, unbiased var, σ_B) for contiguous (N, C, ...) `res`, `y` and fp32 channel vectors."""
    channels, inner, total, chunk, chunks = _layout(y)
    f32 = dict(dtype=torch.float32, device=y.device)
    part = torch.empty(channels * chunks * 2, dtype=torch.float64, device=y.device)
    mean, var, std, ab = (torch.empty(channels, **f32), torch.empty(channels, **f32), torch.empty(channels, **f32),
                          torch.empty(2 * channels, **f32))
    out = torch.empty_like(res)
    with _on(y.device):
        _stats_partials[(channels, chunks)](y, part, channels, inner, total, chunk, chunks, BLOCK=BLOCK, num_warps=4)
        _stats_finish[(channels,)](y, part, gamma, beta, std_run, mean, var, std, ab, channels, inner, total, chunks,
                                   float(eps), num_warps=1)
        _affine[(triton.cdiv(res.numel(), BLOCK),)](res, out, ab, channels, inner, res.numel(), BLOCK=BLOCK,
                                                     num_warps=4, **_clamp_meta(clamp_max))
    return out, mean, var, std


def backward(grad: Tensor, y: Tensor, out: Tensor, gamma: Tensor, beta: Tensor, std_run: Tensor, mean: Tensor,
             std: Tensor, clamp_max: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(∂L/∂res, ∂L/∂y, ∂L/∂γ, ∂L/∂β); sums in fp64, deterministic."""
    channels, inner, total, chunk, chunks = _layout(y)
    f32 = dict(dtype=torch.float32, device=y.device)
    part = torch.empty(channels * chunks * 2, dtype=torch.float64, device=y.device)
    coef = torch.empty(3 * channels, **f32)
    d_gamma, d_beta = torch.empty(channels, **f32), torch.empty(channels, **f32)
    d_res, d_y = torch.empty_like(out), torch.empty_like(y)
    meta = _clamp_meta(clamp_max)
    with _on(y.device):
        _grad_partials[(channels, chunks)](grad, out, part, channels, inner, total, chunk, chunks, BLOCK=BLOCK,
                                           num_warps=4, **meta)
        _grad_finish[(channels,)](part, gamma, beta, std_run, mean, std, coef, d_gamma, d_beta, total, chunks,
                                  num_warps=1)
        _grad_elementwise[(triton.cdiv(out.numel(), BLOCK),)](grad, out, y, coef, d_res, d_y, channels, inner,
                                                               out.numel(), BLOCK=BLOCK, num_warps=4, **meta)
    return d_res, d_y, d_gamma, d_beta

"""Microbenchmark of the quantize-and-gate operator against the reference ops and torch's fake-quant ops.

For each size (2^a … 2^b fp32 elements), tensor kind (weight-shaped with a per-channel g2, or
activation-shaped without) and mode (forward, forward+backward), every provider is timed by
`benchmarks.harness` (median and 20/80 % quantiles of many runs after 3 warm-ups). Bytes moved:
forward reads x and writes y; forward+backward also reads x and ∂L/∂y and writes ∂L/∂x. Prints a
table (ms, GB/s, speed-up over the reference) and writes CSV.

    python -m benchmarks.bench_quantizer --sizes 16-24 --threads 2 --csv bench_out/quantizer.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import bbkernels
from bbkernels import reference

from . import harness

WEIGHT_CHANNELS = 256
ALL_ON = (1.0, 1.0, 1.0, 1.0)  # all five levels active


@dataclass
class Case:
    """Inputs of one benchmark point."""

    x: Tensor
    x_max: Tensor
    gates: Tensor
    g2: Tensor | None
    grad: Tensor


def make_case(log2n: int, kind: str, device: str) -> Case:
    n = 1 << log2n
    shape = (WEIGHT_CHANNELS, n // WEIGHT_CHANNELS) if kind == "weight" else (n,)
    x = torch.randn(shape, device=device)
    g2 = torch.rand(WEIGHT_CHANNELS, device=device) * 0.5 + 0.5 if kind == "weight" else None
    return Case(x, torch.tensor(2.5, device=device), torch.tensor(ALL_ON, device=device), g2, torch.randn_like(x))


def _bb(backend: str) -> Callable[..., Tensor]:
    return lambda x, xm, g, g2: bbkernels.bb_quantize(x, xm, g, g2, signed=True, backend=backend)


def _reference(x, xm, g, g2):
    return reference.bb_quantize(x, xm, g, g2, signed=True)


_compiled_reference = None


def _reference_compiled(x, xm, g, g2):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(_reference, dynamic=True)
    return _compiled_reference(x, xm, g, g2)


_ZERO_POINT: dict[str, Tensor] = {}


def _fake_quant(x, xm, g, g2):
    """torch.fake_quantize_per_tensor_affine (8 bit; STE mask backward): single-bit-width anchor."""
    return torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127)


def _fake_quant_learnable(x, xm, g, g2):
    """torch's learnable-scale fused fake-quant (8 bit): gradients for x, scale and zero point."""
    zp = _ZERO_POINT.setdefault(str(x.device), torch.zeros(1, device=x.device))
    return torch._fake_quantize_learnable_per_tensor_affine(x, xm.reshape(1) / 127, zp, -128, 127, 1.0)


def _copy(x, xm, g, g2):
    return x.clone()


def providers(device: str) -> dict[str, Callable[..., Tensor]]:
    """Provider name → callable(x, x_max, gates, g2) for the device; kernels that cannot run are left out."""
    out: dict[str, Callable[..., Tensor]] = {"reference": _reference, "reference-compiled": _reference_compiled}
    for name in ("cpu", "triton", "cuda"):
        if bbkernels.is_available(name, device) and not (name == "triton" and device == "cpu"):
            out[name] = _bb(name)
    out |= {"torch-fake-quant": _fake_quant, "torch-fake-quant-learnable": _fake_quant_learnable, "copy": _copy}
    return out


def run_point(fn: Callable[..., Tensor], case: Case, mode: str, device: str, reps: int) -> harness.Timing:
    """Per-call times of `fn` on `case` in `mode` (fwd, or fwd+bwd: gradients for every input)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(case.x, case.x_max, case.gates, case.g2)
        return harness.measure(step, device=device, warmup=3, reps=reps)
    x = case.x.detach().requires_grad_()
    small = (case.x_max, case.gates) + ((case.g2,) if case.g2 is not None else ())
    leaves = [t.detach().requires_grad_() for t in small]
    g2 = leaves[2] if case.g2 is not None else None

    def step():
        y = fn(x, leaves[0], leaves[1], g2)
        inputs = [x] + [t for t in leaves if t.grad_fn is None and y.grad_fn is not None]
        torch.autograd.grad(y, inputs, case.grad, allow_unused=True)

    return harness.measure(step, device=device, warmup=3, reps=reps)


def parse_sizes(text: str) -> list[int]:
    """'16-24' → 16…24, '22' → [22]; ValueError for anything else."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and (hi.isdigit() or not hi)) or int(hi or lo) < int(lo):
        raise ValueError(text)
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16-24", help="log2 element counts, e.g. 16-24 or 22 (default 16-24)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=15, help="timed runs per point (median reported)")
    parser.add_argument("--kinds", default="weight,activation", help="weight and/or activation")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    parser.add_argument("--providers", default=None, help="comma-separated subset of providers (default all)")
    parser.add_argument("--csv", type=Path, default=Path("bench_out/quantizer.csv"), help="CSV output path")
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError:
        parser.error(f"--sizes: expected log2 element counts as A-B or A (e.g. 16-24 or 22), got {args.sizes!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = providers(args.device)
    if args.providers:
        unknown = set(args.providers.split(",")) - set(table)
        if unknown:
            parser.error(f"--providers: unknown or unavailable {sorted(unknown)}; available: {sorted(table)}")
        table = {k: v for k, v in table.items() if k in args.providers.split(",")}

    rows = []
    for log2n in sizes:
        for kind in args.kinds.split(","):
            case = make_case(log2n, kind, args.device)
            for mode in args.modes.split(","):
                base = None
                for name, fn in table.items():
                    reps = max(3, args.reps // 3) if name.startswith("reference") else args.reps
                    timing = run_point(fn, case, mode, args.device, reps)
                    ms = timing.median
                    base = ms if name == "reference" else base
                    nbytes = case.x.numel() * case.x.element_size() * (2 if mode == "fwd" else 5)
                    rows.append(dict(provider=name, kind=kind, log2n=log2n, numel=case.x.numel(), mode=mode,
                                     **timing.summary("ms"), gbps=round(nbytes / ms / 1e6, 2),
                                     speedup_vs_reference=round(base / ms, 2) if base else ""))
                    print(f"{kind:10s} 2^{log2n:<3d} {mode:8s} {name:28s} {ms:10.3f} ms", file=sys.stderr)

    harness.write_csv(args.csv, rows, args.device)
    print(f"\n{harness.device_name(args.device)}, {args.threads} threads, torch {torch.__version__}; CSV: {args.csv}")
    print(f"{'kind':10s} {'size':>5s} {'mode':8s} {'provider':28s} {'ms':>10s} {'GB/s':>8s} {'vs ref':>7s}")
    for r in rows:
        print(f"{r['kind']:10s} {'2^' + str(r['log2n']):>5s} {r['mode']:8s} {r['provider']:28s} "
              f"{r['ms']:10.3f} {r['gbps']:8.2f} {r['speedup_vs_reference']!s:>7s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

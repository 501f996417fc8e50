"""Time a whole ResNet-18's worth of quantizer calls (49 tensors), forward + backward, per backend.

The 21 weights (20 convs with per-channel g2, the fc without) and 28 activations at 224×224 (stem
output; per block conv1 output, conv2 output, block output, and the 3 downsample outputs), each
quantized with `bbkernels.bb_quantize` and differentiated with respect to x, x_max, gates and g2.
On CUDA the whole step is captured in one CUDA graph and replayed (launch overhead excluded); on
the CPU it runs eagerly (smoke test). Prints a table last and writes a CSV to $OUT (else ./bench_out).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import bbkernels

STAGES = ((64, 56, 1), (128, 28, 2), (256, 14, 2), (512, 7, 2))  # channels, spatial size, first stride


def resnet18_quantized_tensors(batch: int) -> list[tuple[str, tuple[int, ...], bool, bool]]:
    """(name, shape, signed, has_g2) of every quantized tensor of ResNet-18 at 224×224 (SPEC B §4.2)."""
    out = [("conv1.weight", (64, 3, 7, 7), True, True), ("stem.act", (batch, 64, 112, 112), False, False)]
    c_in = 64
    for layer, (c, hw, stride) in enumerate(STAGES, start=1):
        for block in range(2):
            name = f"layer{layer}.{block}"
            first_in = c_in if block == 0 else c
            out.append((f"{name}.conv1.weight", (c, first_in, 3, 3), True, True))
            out.append((f"{name}.conv1.act", (batch, c, hw, hw), False, False))
            out.append((f"{name}.conv2.weight", (c, c, 3, 3), True, True))
            out.append((f"{name}.conv2.act", (batch, c, hw, hw), True, False))  # feeds the residual add
            if block == 0 and stride == 2:
                out.append((f"{name}.downsample.weight", (c, c_in, 1, 1), True, True))
                out.append((f"{name}.downsample.act", (batch, c, hw, hw), True, False))
            out.append((f"{name}.out.act", (batch, c, hw, hw), False, False))
        c_in = c
    out.append(("fc.weight", (1000, 512), True, False))  # logits layer: quantized, never pruned
    return out


def make_step(
    provider: str, batch: int, device: str, dtype: torch.dtype, gates: list[float]
) -> tuple[Callable[[], list[Tensor]], int]:
    """A closure running forward + backward of all quantizers on `provider`; and the element count."""
    gen = torch.Generator(device=device).manual_seed(0)
    rand = dict(generator=gen, device=device)
    items, numel = [], 0
    for _, shape, signed, has_g2 in resnet18_quantized_tensors(batch):
        x = torch.randn(shape, **rand).to(dtype).requires_grad_()
        x_max = torch.tensor(2.0, device=device, requires_grad=True)
        g = torch.tensor(gates, device=device, requires_grad=True)
        g2 = torch.rand(shape[0], **rand).requires_grad_() if has_g2 else None
        grad = torch.randn(shape, **rand).to(dtype)
        items.append((x, x_max, g, g2, grad, signed))
        numel += x.numel()

    def step() -> list[Tensor]:
        outs, grads, leaves = [], [], []
        for x, x_max, g, g2, grad, signed in items:
            outs.append(bbkernels.bb_quantize(x, x_max, g, g2, signed=signed, backend=provider))
            grads.append(grad)
            leaves += [t for t in (x, x_max, g, g2) if t is not None]
        return list(torch.autograd.grad(outs, leaves, grad_outputs=grads))

    return step, numel


def time_cuda_graph(step: Callable[[], list[Tensor]], iters: int) -> tuple[float, float]:
    """(graph replay ms, eager ms), medians over `iters` runs each."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()  # compiles Triton kernels / builds extensions outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def median_ms(run: Callable[[], object]) -> float:
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    graph_ms = median_ms(graph.replay)
    eager_ms = median_ms(step)
    del graph
    return graph_ms, eager_ms


def time_eager_cpu(step: Callable[[], list[Tensor]], iters: int) -> float:
    """Median ms of eager runs on the CPU."""
    step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64, help="activation batch size (default 64)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--gates", default="1,1,0,0", help="g4,g8,g16,g32 for every quantizer (default: 8 bit)")
    parser.add_argument("--providers", default=None, help="comma list (default: every available backend)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--csv", default=None, help="CSV path (default $OUT/resnet18_quantizers.csv)")
    args = parser.parse_args(argv)

    device, dtype = args.device, getattr(torch, args.dtype)
    gates = [float(v) for v in args.gates.split(",")]
    providers = args.providers.split(",") if args.providers else bbkernels.available_backends(device)
    rows = []
    for provider in providers:
        if not bbkernels.is_available(provider, device):
            print(f"skip {provider}: not available on {device}")
            continue
        step, numel = make_step(provider, args.batch, device, dtype, gates)
        if device == "cuda":
            graph_ms, eager_ms = time_cuda_graph(step, args.iters)
            torch.cuda.empty_cache()
        else:
            graph_ms, eager_ms = float("nan"), time_eager_cpu(step, args.iters)
        # bytes: read x, grad and x again in backward, write y and dx
        gbps = 5 * numel * torch.finfo(dtype).bits / 8 / (graph_ms if device == "cuda" else eager_ms) / 1e6
        rows.append(dict(provider=provider, device=device, dtype=args.dtype, batch=args.batch, tensors=49,
                         elements=numel, graph_ms=round(graph_ms, 4), eager_ms=round(eager_ms, 4),
                         effective_GBps=round(gbps, 1)))  # fmt: skip
        del step

    out = Path(args.csv) if args.csv else Path(os.environ.get("OUT") or "bench_out") / "resnet18_quantizers.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nResNet-18 quantizers ({name}, batch {args.batch}, {args.dtype}, gates {args.gates}), fwd+bwd -> {out}")
    print(f"{'provider':<12}{'graph ms':>12}{'eager ms':>12}{'GB/s':>10}")
    for r in rows:
        print(f"{r['provider']:<12}{r['graph_ms']:>12.3f}{r['eager_ms']:>12.3f}{r['effective_GBps']:>10.1f}")


if __name__ == "__main__":
    main()

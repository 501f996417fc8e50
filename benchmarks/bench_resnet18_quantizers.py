"""Time a whole ResNet-18's worth of quantizer calls, forward + backward, per backend.

The quantized tensors are those of `bayesian_bits.build_model("resnet18")` with pruning (weights with a
per-channel g2 except the logits layer's, and the layer outputs), read off the model by one calibration
forward of a batch at 224×224: each quantizer's input shape, and its signedness by the calibration rule
(signed iff the tensor has a negative value). Each tensor is quantized with `bbkernels.bb_quantize` and
differentiated with respect to x, x_max, gates and g2. On CUDA the whole step is captured in one CUDA graph
and replayed (launch overhead excluded); on the CPU it runs eagerly (smoke test). Timing and peak memory
by `benchmarks.harness`. Prints a table last and writes a CSV to $OUT (else ./bench_out).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import bayesian_bits as bb
import bbkernels

from . import harness

IMAGE_SIZE = 224  # the ImageNet training input
NAN = float("nan")


class QuantizedTensor(NamedTuple):
    """One quantizer's input in the model."""

    name: str
    shape: tuple[int, ...]
    signed: bool
    has_g2: bool


def resnet18_quantized_tensors(batch: int, device: str) -> list[QuantizedTensor]:
    """Every quantized tensor of Bayesian Bits ResNet-18 (with pruning) for a `batch`×3×224×224 input, in call order,
    from forward pre-hooks on its quantizers during one calibration forward."""
    torch.manual_seed(0)
    model = bb.build_model("resnet18", bb.QuantConfig(include_pruning=True)).to(device)
    found: dict[str, QuantizedTensor] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(quantizer: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            found[name] = QuantizedTensor(name, tuple(x.shape), bool((x < 0).any()), quantizer.keep_mask() is not None)
        return record

    handles = [q.register_forward_pre_hook(recorder(name)) for name, q in bb.quantizers(model)]
    try:
        bb.calibrate(model, torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return list(found.values())


def make_step(
    tensors: list[QuantizedTensor], provider: str, device: str, dtype: torch.dtype, gates: list[float]
) -> tuple[Callable[[], list[Tensor]], int]:
    """A closure running forward + backward of all quantizers on `provider`; and the element count."""
    gen = torch.Generator(device=device).manual_seed(0)
    rand = dict(generator=gen, device=device)
    items, numel = [], 0
    for _, shape, signed, has_g2 in tensors:
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


def time_cuda_graph(step: Callable[[], list[Tensor]], iters: int) -> harness.Timing:
    """Replays of `step` captured in one CUDA graph, timed `iters` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()  # compiles Triton kernels / builds extensions outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    timing = harness.measure(graph.replay, device="cuda", warmup=1, reps=iters)
    del graph
    return timing


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
    tensors = resnet18_quantized_tensors(args.batch, device)
    rows = []
    for provider in providers:
        if not bbkernels.is_available(provider, device):
            print(f"skip {provider}: not available on {device}")
            continue
        step, numel = make_step(tensors, provider, device, dtype, gates)
        graph = time_cuda_graph(step, args.iters) if device == "cuda" else None
        eager = harness.measure(step, device=device, warmup=1, reps=args.iters)
        peak = harness.peak_memory(step, device)
        # bytes: read x, grad and x again in backward, write y and dx
        gbps = 5 * numel * torch.finfo(dtype).bits / 8 / (graph or eager).median / 1e6
        rows.append(dict(provider=provider, device=device, dtype=args.dtype, batch=args.batch, tensors=len(tensors),
                         elements=numel, **(graph.summary("graph_ms") if graph else {"graph_ms": NAN}),
                         **eager.summary("eager_ms"), effective_GBps=round(gbps, 1),
                         peak_MiB=round(peak / 2**20, 1)))  # fmt: skip
        del step
        if device == "cuda":
            torch.cuda.empty_cache()

    out = Path(args.csv) if args.csv else Path(os.environ.get("OUT") or "bench_out") / "resnet18_quantizers.csv"
    if rows:
        harness.write_csv(out, rows, device)
    name = harness.device_name(device)
    print(f"\nResNet-18 quantizers ({name}, batch {args.batch}, {args.dtype}, gates {args.gates}), fwd+bwd -> {out}")
    print(f"{'provider':<12}{'graph ms':>12}{'eager ms':>12}{'GB/s':>10}")
    for r in rows:
        print(f"{r['provider']:<12}{r['graph_ms']:>12.3f}{r['eager_ms']:>12.3f}{r['effective_GBps']:>10.1f}")


if __name__ == "__main__":
    main()

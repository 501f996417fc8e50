"""ResNet-18 training step, Bayesian Bits against float torchvision: time and saved-for-backward memory.

Acceptance (issue 4): with all gates on (gammas 6, 6, 6, −6) and pruning, batch 8 at 224×224 on the CPU
with 2 threads, a step takes at most 2.3× the float step and saves at most 2.5× the bytes for backward.

    .venv/bin/python -m benchmarks.bench_resnet18_step [--steps 7] [--batch 8] [--size 224] [--threads 2] [--csv F]

Steps are timed by `benchmarks.harness` (medians); "saved" is the bytes autograd keeps for the backward, "peak"
the most tensor bytes one step holds at once (the harness's peak memory, a separate profiled step).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bayesian_bits as bb
import bbkernels

from . import harness

TIME_LIMIT = 2.3
MEMORY_LIMIT = 2.5


def saved_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward and loss."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def trainer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, reg: bool) -> Callable[[], None]:
    """A function running one full training step: forward, loss, backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        if reg:
            loss = loss + 0.01 * bb.regularizer(model)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=Path("bench_out/resnet18_step.csv"), help="CSV output path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    float_model = torchvision.models.resnet18().train()
    config = bb.QuantConfig(6.0, 6.0, 6.0, -6.0, include_pruning=True, reg_type="bop")
    model = bb.build_model("resnet18", config)
    bb.calibrate(model, images[:2])
    bb.assign_macs(model)
    backend = bbkernels.resolve_backend("cpu")
    if backend != "cpu":
        raise SystemExit(f"the fused C++ kernel is not available (backend {backend!r}); "
                         "build it with python -m bbkernels.build")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bbkernels backend {backend}")
    print(f"batch {args.batch}×3×{args.size}×{args.size}, {args.steps} timed steps each (median)")

    mem_float, mem_bb = saved_bytes(float_model, images, labels), saved_bytes(model, images, labels)
    steps = {"float torchvision": trainer(float_model, images, labels, reg=False),
             "Bayesian Bits": trainer(model, images, labels, reg=True)}
    # The two models' steps alternate so that machine noise hits both alike; one warm-up step each.
    timings = harness.measure_alternating(steps, device="cpu", warmup=1, reps=args.steps)
    peaks = {name: harness.peak_memory(step, "cpu") for name, step in steps.items()}
    saved = {"float torchvision": mem_float, "Bayesian Bits": mem_bb}
    rows = [dict(model=name, batch=args.batch, size=args.size, steps=args.steps,
                 **timings[name].summary("step_ms", digits=1), saved_MiB=round(saved[name] / 2**20, 1),
                 peak_MiB=round(peaks[name] / 2**20, 1)) for name in steps]
    harness.write_csv(args.csv, rows, "cpu")
    print(f"{'':<22} {'step [s]':>9} {'saved [MiB]':>12} {'peak [MiB]':>11}")
    for row in rows:
        print(f"{row['model']:<22} {row['step_ms'] / 1e3:>9.3f} {row['saved_MiB']:>12.1f} {row['peak_MiB']:>11.1f}")
    print(f"CSV: {args.csv}")
    tf, tq = (timings[name].median for name in steps)
    time_ratio, mem_ratio = tq / tf, mem_bb / mem_float
    print(f"time ratio {time_ratio:.2f}× (limit {TIME_LIMIT}×)")
    print(f"saved-memory ratio {mem_ratio:.2f}× (limit {MEMORY_LIMIT}×)")
    ok = time_ratio <= TIME_LIMIT and mem_ratio <= MEMORY_LIMIT
    print("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

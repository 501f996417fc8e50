"""ResNet-18 training step, Bayesian Bits with each BN fold against float torchvision: time and saved-for-backward
memory, the three steps alternating in one run.

Goals (issue 21), all gates on (gammas 6, 6, 6, −6) with pruning: batch 8 at 224×224 with 2 threads, the `fast` fold
at most 1.3× the float step's time and saved bytes, `exact` at most 2.1× its time (and saved bytes no more than
before, 1.87×); dispatch-bound (batch 2 at 16×16, 1 thread) both at most 2× its time.

    .venv/bin/python -m benchmarks.bench_resnet18_step [--steps 7] [--batch 8] [--size 224] [--threads 2]
                                                       [--device cpu|cuda] [--csv F]

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

FOLDS = ("exact", "fast")


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


def trainer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, reg: bool,
            foreach: bool | None = None) -> Callable[[], None]:
    """A function running one full training step: forward, loss (+ 0.01 × the BOP regulariser when `reg`), backward,
    SGD step with momentum over every parameter (`foreach`: torch's choice for the device by default); the ranges
    stay positive by the optimizer's projection hook (`bayesian_bits.ranges`)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=foreach)

    def step() -> None:
        model.zero_grad(set_to_none=True)
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--csv", type=Path, default=Path("bench_out/resnet18_step.csv"), help="CSV output path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    models = {"float torchvision": torchvision.models.resnet18().to(device).train()}
    for fold in FOLDS:
        config = bb.QuantConfig(6.0, 6.0, 6.0, -6.0, include_pruning=True, reg_type="bop", bn_fold=fold)
        model = bb.build_model("resnet18", config).to(device)
        bb.calibrate(model, images[:2])
        bb.assign_macs(model)
        models[f"Bayesian Bits {fold}"] = model
    backend = bbkernels.resolve_backend(device)
    print(f"torch {torch.__version__}, {harness.device_name(args.device)}, {torch.get_num_threads()} threads, "
          f"bbkernels backend {backend}")
    print(f"batch {args.batch}×3×{args.size}×{args.size}, {args.steps} timed steps each (median)")

    saved = {name: saved_bytes(m, images, labels) for name, m in models.items()}
    steps = {name: trainer(m, images, labels, reg=name != "float torchvision") for name, m in models.items()}
    # The steps alternate so that machine noise hits all alike; one warm-up step each.
    timings = harness.measure_alternating(steps, device=args.device, warmup=1, reps=args.steps)
    peaks = {name: harness.peak_memory(step, args.device) for name, step in steps.items()}
    base_time, base_saved = timings["float torchvision"].median, saved["float torchvision"]
    rows = [dict(model=name, batch=args.batch, size=args.size, steps=args.steps,
                 **timings[name].summary("step_ms", digits=1), saved_MiB=round(saved[name] / 2**20, 1),
                 peak_MiB=round(peaks[name] / 2**20, 1), time_ratio=round(timings[name].median / base_time, 3),
                 saved_ratio=round(saved[name] / base_saved, 3)) for name in models]
    harness.write_csv(args.csv, rows, args.device)
    print(f"{'':<24} {'step [ms]':>10} {'× float':>8} {'saved [MiB]':>12} {'× float':>8} {'peak [MiB]':>11}")
    for row in rows:
        print(f"{row['model']:<24} {row['step_ms']:>10.1f} {row['time_ratio']:>8.2f} {row['saved_MiB']:>12.1f} "
              f"{row['saved_ratio']:>8.2f} {row['peak_MiB']:>11.1f}")
    print(f"CSV: {args.csv}")


if __name__ == "__main__":
    main()

"""LeNet5 MNIST training epoch: float vs Bayesian Bits (fused kernel) vs Bayesian Bits on the reference op.

Each variant runs one epoch of the real training loop (`bayesian_bits.pipeline.loop.train_epoch`) with the
reference README's MNIST settings (batch 128, Adam 1e-3 for every group, λ = 0.1, gammas 6, 6, −6, −6,
pruning, BOP regulariser), after a few warm-up batches, timed by `benchmarks.harness`. Prints the epoch times
and ratios, writes JSON.

    python -m benchmarks.bench_lenet5_epoch --data-dir data --threads 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import bayesian_bits as bb
from bayesian_bits.data import mnist, train_loader
from bayesian_bits.pipeline.distributed import DistEnv
from bayesian_bits.pipeline.loop import StepSettings, TrainingModule, train_epoch

from . import harness

CONFIG = bb.QuantConfig(
    gamma_4_init=6, gamma_8_init=6, gamma_16_init=-6, gamma_32_init=-6, include_pruning=True, reg_type="bop"
)
GATING_LAMBDA = 0.1


def build(variant: str, calibration: torch.Tensor) -> TrainingModule:
    """The model of `variant` wrapped with its loss terms."""
    torch.manual_seed(0)
    if variant == "float":
        return TrainingModule(bb.build_float_model("lenet5quantized"), None)
    model = bb.build_model("lenet5quantized", CONFIG)
    bb.calibrate(model, calibration)
    bb.assign_macs(model)
    return TrainingModule(model, bb.regularizer)


def time_epoch(variant: str, loader, calibration: torch.Tensor, batches: int | None, warmup: int) -> float:
    """Seconds for one training epoch (or `batches` batches) of `variant`."""
    if variant == "bayesian-bits-reference":
        os.environ["BBKERNELS_BACKEND"] = "reference"
    try:
        module = build(variant, calibration)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        env = DistEnv(0, 1, torch.device("cpu"))
        run = lambda n: train_epoch(  # noqa: E731
            module, loader, [optimizer], [], StepSettings(GATING_LAMBDA, 0.0, None, None, n), env, variant
        )
        run(warmup)
        return harness.measure(lambda: run(batches), device="cpu", warmup=0, reps=1).median / 1e3
    finally:
        os.environ.pop("BBKERNELS_BACKEND", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="MNIST root (downloaded when missing)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--batches", type=int, default=None, help="batches per timed epoch (default: all 469)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up batches per variant (default 10)")
    parser.add_argument("--json", type=Path, default=Path("bench_out/lenet5_epoch.json"), help="JSON output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, _ = mnist(args.data_dir)
    loader = train_loader(train, 128, 2, 0, 1, seed=0, pin_memory=False)
    calibration = next(iter(loader))[0][:2]
    seconds = {v: time_epoch(v, loader, calibration, args.batches, args.warmup)
               for v in ("float", "bayesian-bits", "bayesian-bits-reference")}
    result = {
        "seconds": seconds,
        "bb_over_float": seconds["bayesian-bits"] / seconds["float"],
        "reference_over_bb": seconds["bayesian-bits-reference"] / seconds["bayesian-bits"],
        "batches": args.batches or len(loader),
    }
    harness.write_json(args.json, result, "cpu")
    for variant, s in seconds.items():
        print(f"{variant:26s} {s:8.1f} s")
    print(f"Bayesian Bits / float: {result['bb_over_float']:.2f}x (target <= 1.5x); "
          f"reference op / fused: {result['reference_over_bb']:.2f}x (target >= 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

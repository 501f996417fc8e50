"""`--compile` against eager: one training step and one eval forward of the prepared LeNet5 and ResNet-18.

Each model is wrapped as the CLI trains it (`pipeline.loop.TrainingModule`: logits, BOP regulariser, no L2),
with the README's gates (LeNet5: 6, 6, −6, −6; ResNet-18: 6, 6, 6, −6), pruning, Adam 1e-3 on every parameter,
loss CE + 0.1 · regulariser. The eager and the `torch.compile`d module are separate copies of the same model; the
first compiled calls (compilation) are timed on their own, then the steps alternate call by call
(`benchmarks.harness`, medians). Eval: one forward in eval mode under no_grad.

    python -m benchmarks.bench_compile [--models lenet5quantized resnet18] [--steps 10] [--threads 2]
        [--device cpu|cuda] [--batch N] [--csv F]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import bayesian_bits as bb
import bbkernels
from bayesian_bits.pipeline.loop import TrainingModule

from . import harness

SHAPES = {"lenet5quantized": (128, 1, 28, 28), "resnet18": (8, 3, 224, 224)}  # batch: README / step benchmark
GAMMAS = {"lenet5quantized": (6.0, 6.0, -6.0, -6.0), "resnet18": (6.0, 6.0, 6.0, -6.0)}
CLASSES = {"lenet5quantized": 10, "resnet18": 1000}
MU = 0.1


def training_step(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One step of the CLI's loop: forward with the regulariser, CE + μ·R, backward, Adam."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, reg, _ = module(images)
        (F.cross_entropy(logits, labels) + MU * reg).backward()
        optimizer.step()

    return step


def eval_forward(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(images)

    return forward


def first_call_s(fn: Callable[[], None], device: str, calls: int = 2) -> float:
    """Seconds of the first `calls` calls (compilation, including a recompile on the second call if any)."""
    return sum(harness.measure(fn, device=device, warmup=0, reps=calls).samples_ms) / 1e3


def bench(name: str, steps: int, device: str, batch: int | None) -> list[dict]:
    torch.manual_seed(0)
    shape = (batch or SHAPES[name][0], *SHAPES[name][1:])
    images = (torch.randn(shape) if name == "resnet18" else torch.rand(shape)).to(device)
    labels = torch.randint(0, CLASSES[name], (shape[0],)).to(device)
    config = bb.QuantConfig(*GAMMAS[name], include_pruning=True, reg_type="bop")
    model = bb.build_model(name, config).to(device)
    bb.calibrate(model, images[:2])
    bb.assign_macs(model)
    eager = TrainingModule(model, bb.regularizer)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(TrainingModule(compiled_model, bb.regularizer))
    for m in (eager, compiled):
        m.train()
    train_fns = {"eager": training_step(eager, images, labels), "compiled": training_step(compiled, images, labels)}
    compile_train_s = first_call_s(train_fns["compiled"], device)
    train = harness.measure_alternating(train_fns, device=device, warmup=1, reps=steps)
    model.eval()
    compiled_model.eval()
    eval_fns = {"eager": eval_forward(model, images), "compiled": eval_forward(torch.compile(compiled_model), images)}
    compile_eval_s = first_call_s(eval_fns["compiled"], device)
    evals = harness.measure_alternating(eval_fns, device=device, warmup=1, reps=steps)
    rows = []
    for kind, timings, compile_s in (("train step", train, compile_train_s), ("eval forward", evals, compile_eval_s)):
        rows.append({"model": name, "batch": shape[0], "kind": kind, "steps": steps,
                     **{f"eager_{k}": v for k, v in timings["eager"].summary("ms", digits=1).items()},
                     **{f"compiled_{k}": v for k, v in timings["compiled"].summary("ms", digits=1).items()},
                     "compiled_over_eager": round(timings["compiled"].median / timings["eager"].median, 3),
                     "first_compiled_calls_s": round(compile_s, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=10, help="timed calls per variant (default 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default LeNet5 128, ResNet-18 8)")
    parser.add_argument("--csv", type=Path, default=Path("bench_out/compile.csv"), help="CSV output path")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; run on the CPU (--device cpu)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bbkernels backend "
          f"{bbkernels.resolve_backend(args.device)}")
    rows = [row for name in args.models for row in bench(name, args.steps, args.device, args.batch)]
    harness.write_csv(args.csv, rows, args.device)
    print(f"{'model':<16} {'':<13} {'eager [ms]':>11} {'compiled [ms]':>14} {'ratio':>6} {'first 2 compiled [s]':>21}")
    for r in rows:
        print(f"{r['model']:<16} {r['kind']:<13} {r['eager_ms']:>11.1f} {r['compiled_ms']:>14.1f} "
              f"{r['compiled_over_eager']:>6.2f} {r['first_compiled_calls_s']:>21.1f}")
    print(f"CSV: {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

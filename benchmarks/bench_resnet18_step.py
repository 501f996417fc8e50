"""ResNet-18 training step, Bayesian Bits against float torchvision: time and saved-for-backward memory.

Acceptance (issue 4): with all gates on (gammas 6, 6, 6, −6) and pruning, batch 8 at 224×224 on the CPU
with 2 threads, a step takes at most 2.3× the float step and saves at most 2.5× the bytes for backward.

    .venv/bin/python -m benchmarks.bench_resnet18_step [--steps 5] [--batch 8] [--size 224] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import bayesian_bits as bb
import bbkernels
from bayesian_bits.models import torchvision_model

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


def trainer(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, reg: bool):
    """A function running one full training step (forward, loss, backward, SGD step) and returning its time."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        if reg:
            loss = loss + 0.01 * bb.regularizer(model)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    float_model = torchvision_model("resnet18").train()
    config = bb.QuantConfig(6.0, 6.0, 6.0, -6.0, include_pruning=True, reg_type="bop")
    model = bb.build_model("resnet18", config)
    bb.calibrate(model, images[:2])
    bb.assign_macs(model)
    backend = bbkernels.resolve_backend("cpu")
    if backend != "cpu":
        raise SystemExit(f"the fused C++ kernel is not available (backend {backend!r}); build csrc/ first")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bbkernels backend {backend}")
    print(f"batch {args.batch}×3×{args.size}×{args.size}, {args.steps} timed steps each (median)")

    mem_float, mem_bb = saved_bytes(float_model, images, labels), saved_bytes(model, images, labels)
    # Alternate the two models step by step so machine noise hits both alike; one warm-up step each.
    float_step, bb_step = trainer(float_model, images, labels, reg=False), trainer(model, images, labels, reg=True)
    t_float, t_bb = [], []
    for i in range(args.steps + 1):
        tf_i, tq_i = float_step(), bb_step()
        if i:
            t_float.append(tf_i)
            t_bb.append(tq_i)
    tf, tq = statistics.median(t_float), statistics.median(t_bb)
    print(f"{'':<22} {'step [s]':>9} {'saved [MiB]':>12}")
    print(f"{'float torchvision':<22} {tf:>9.3f} {mem_float / 2**20:>12.1f}")
    print(f"{'Bayesian Bits':<22} {tq:>9.3f} {mem_bb / 2**20:>12.1f}")
    time_ratio, mem_ratio = tq / tf, mem_bb / mem_float
    print(f"time ratio {time_ratio:.2f}× (limit {TIME_LIMIT}×)")
    print(f"saved-memory ratio {mem_ratio:.2f}× (limit {MEMORY_LIMIT}×)")
    ok = time_ratio <= TIME_LIMIT and mem_ratio <= MEMORY_LIMIT
    print("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

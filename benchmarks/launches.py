"""Kernel launches per training step and per eval forward, counted as a GPU would see them.

A `TorchDispatchMode` counts every ATen op that reaches a kernel: views and allocations are left out (they launch
nothing), and the ATen ops inside the project's custom ops (`bbkernels::*`) are counted as well as the op itself (its
kernel; on a GPU its Triton implementation launches 1 (quantize forward, 2 backward) or 3 (fold) kernels). The count
depends only on the model and the code, not on the machine, so it is the same figure everywhere. Host reads of
device values (`.item()`, `bool(t)`: a synchronisation on a GPU) are reported beside it. Neither counts the
operator's eager value check on CPU tensors (on a GPU the kernels check the values themselves, see
bbkernels/validation.py).

    .venv/bin/python -m benchmarks.launches [--models resnet18 mobilenet_v2 vit] [--batch 2] [--size 64]
                                            [--top 12] [--json F]

Goals (issue 21), ResNet-18 at batch 2, 64²: the training step (forward, CE + regulariser, backward, SGD)
launches at most 3× the float step's ops with `--bn-fold exact`, 2× with `fast`; the eval forward at most 2×
(an evaluation's batches after its first: the first quantizes the weights, the others reuse them). `vit` is the
ViT-style model of tests/zoo.py (patch conv, two pre-norm attention blocks written with Linear and matmul) at
16×16, the one the pre-bank code (commit c3709a7, torch.fx capture) could count too.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from bbkernels.validation import VALUE_CHECK

from . import harness
from .bench_resnet18_step import trainer

# Ops that only allocate or describe memory (no kernel), besides the view ops the schema marks.
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
               "alias", "set_", "resize_", "_unsafe_view", "_reshape_alias", "unbind", "split", "split_with_sizes",
               "chunk", "view", "as_strided", "_to_copy_noop"}
SYNCS = {"_local_scalar_dense", "item"}  # device-to-host reads: the host waits for the device


def _name(func: torch._ops.OpOverload) -> str:
    return func.overloadpacket.__name__


def _is_view(func: torch._ops.OpOverload) -> bool:
    """An op whose outputs alias an input without writing it (view, select, transpose, ...)."""
    schema = func._schema
    return not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)


def _device_keys(args: tuple) -> torch._C.DispatchKeySet:
    device = next(a.device for a in args if isinstance(a, Tensor))
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ATen ops that launch a kernel, by op name; `syncs` counts host reads of device values."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.syncs = 0
        self._in_op = False  # inside a bbkernels op
        self._ranges: list[bool] = []  # open profiler ranges: True for the operator's CPU-only value check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if func.namespace == "profiler":
            if name == "_record_function_enter_new":
                self._ranges.append(args[0] == VALUE_CHECK)
            elif name == "_record_function_exit" and self._ranges:
                self._ranges.pop()
        elif any(self._ranges):  # only CPU tensors are checked here; a GPU kernel checks its values itself
            pass
        elif name in SYNCS:
            self.syncs += 1
        elif not (_is_view(func) or name in ALLOCATIONS):
            namespace = func.namespace
            self.counts[name if namespace == "aten" else f"{namespace}::{name}"] += 1
            if namespace.startswith("bbkernels") and not self._in_op:
                self._in_op = True
                try:
                    with self:  # what the custom op runs besides its kernel is launched too: run its device kernel
                        return func.redispatch(_device_keys(args), *args, **kwargs)
                finally:
                    self._in_op = False
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count(fn: Callable[[], object]) -> LaunchCounter:
    """Run `fn` once under a fresh counter."""
    counter = LaunchCounter()
    with counter:
        fn()
    return counter


def eval_forward(model: nn.Module, images: Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(images)

    return forward


def _prepared(float_model: nn.Module, size: int, bn_fold: str) -> nn.Module:
    import bayesian_bits as bb

    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    config = bb.QuantConfig(6.0, 6.0, 6.0, -6.0, include_pruning=True, reg_type="bop", bn_fold=bn_fold)
    model = bb.prepare(float_model, images[:1], config)
    bb.calibrate(model, images)
    bb.assign_macs(model)
    return model


def _float_model(name: str, size: int) -> tuple[nn.Module, int]:
    """The float model `name` (a torchvision builder, or `vit`) and its input size."""
    import torchvision

    torch.manual_seed(0)
    if name == "vit":
        from tests.zoo import TinyTransformer

        return TinyTransformer(), 16
    return torchvision.models.get_model(name, num_classes=10), size


def measure(name: str, batch: int, size: int) -> list[dict]:
    """Rows for the float model and the prepared one with each BN fold: training-step and eval-forward launches and
    syncs."""
    float_model, size = _float_model(name, size)
    variants = [("float", float_model, False)] + [(f"bb {fold}", _prepared(float_model, size, fold), True)
                                                  for fold in ("exact", "fast")]
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    rows = []
    for variant, m, reg in variants:
        m.train()
        step = trainer(m, images, labels, reg, foreach=True)  # multi-tensor SGD, as on a GPU
        step()  # warm-up: optimizer state, lazily built kernels
        train = count(step)
        m.eval()
        forward = eval_forward(m, images)
        forward()  # warm-up: an evaluation's first batch quantizes the weights, the others reuse them
        evaluation = count(forward)
        rows.append({"model": name, "variant": variant, "batch": batch, "size": size,
                     "train_launches": train.total, "train_syncs": train.syncs,
                     "eval_launches": evaluation.total, "eval_syncs": evaluation.syncs,
                     "train_top": train.counts.most_common(), "eval_top": evaluation.counts.most_common()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--top", type=int, default=12, help="ops listed per row, most frequent first")
    parser.add_argument("--json", type=Path, default=Path("bench_out/launches.json"))
    args = parser.parse_args()
    rows = [row for name in args.models for row in measure(name, args.batch, args.size)]
    for row in rows:
        print(f"{row['model']:<14} {row['variant']:<9} train {row['train_launches']:>6} launches "
              f"{row['train_syncs']:>4} syncs   eval {row['eval_launches']:>5} launches {row['eval_syncs']:>4} syncs")
        print("   train: " + ", ".join(f"{k} {v}" for k, v in row["train_top"][: args.top]))
    harness.write_json(args.json, {"rows": rows}, "cpu")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()

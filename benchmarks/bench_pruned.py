"""CPU latency and parameter count of the ``pruned`` export against the unpruned (masked) eval model, and of the
``onnx`` export under onnxruntime.

    python -m benchmarks.bench_pruned CHECKPOINT [--batch 1 64] [--threads 1] [--image-size N] [--out FILE]

Both PyTorch models run in eval mode with the same fake-quantized activations; the pruned one has the pruned
channels physically removed; the ONNX graph is the pruned model with QDQ nodes, run by onnxruntime's CPU provider
with the same thread count. Prints and writes JSON (median of --repeats timed forwards after warm-up, timed by
`benchmarks.harness`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bayesian_bits.export import load_eval_model, onnx_model, onnxruntime_session
from bayesian_bits.export.pruned import layer_parameters

from . import harness


@torch.no_grad()
def latency_ms(model: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward in milliseconds, after 3 warm-up calls."""
    return harness.measure(lambda: model(x), device="cpu", warmup=3, reps=repeats).median


def onnxruntime_forward(proto: Any, threads: int) -> Callable[[torch.Tensor], object]:
    """An ONNX graph as a callable on an onnxruntime session with ``threads`` threads."""
    session = onnxruntime_session(proto, threads)
    return lambda x: session.run(None, {"input": x.numpy()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench_pruned.json")
    parser.add_argument("--image-size", type=int, help="input side (ResNet-18/MobileNetV2; default: the training's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_eval_model(args.checkpoint, image_size=args.image_size)
    pruned, proto = onnx_model(loaded)
    ort_forward = onnxruntime_forward(proto, args.threads)
    result = {
        "checkpoint": args.checkpoint,
        "model": loaded.name,
        "parameters": {"eval": layer_parameters(loaded.model), "pruned": layer_parameters(pruned)},
        "latency_ms": {},
    }
    for batch in args.batch:
        x = torch.rand(batch, *loaded.input_shape[1:])
        full, small = latency_ms(loaded.model, x, args.repeats), latency_ms(pruned, x, args.repeats)
        ort = latency_ms(ort_forward, x, args.repeats)
        result["latency_ms"][str(batch)] = {"eval": full, "pruned": small, "onnxruntime": ort,
                                            "speedup": full / small}
    print(json.dumps(harness.write_json(Path(args.out), result, "cpu"), indent=1))


if __name__ == "__main__":
    main()

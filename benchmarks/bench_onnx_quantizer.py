"""What one activation quantizer costs onnxruntime, in the forms the ONNX export can write: QuantizeLinear →
DequantizeLinear with per-axis vectors along axis 1 or with scalars, and the float form Clip → Div → Round → Mul.

    python -m benchmarks.bench_onnx_quantizer [--threads 1] [--reps 15] [--json F]

Each graph chains 10 quantizers on one input, run with onnxruntime's graph optimisations off (on, they would fold
the chain of Q/DQ pairs into one, which cannot happen between the convolutions of a real graph); the table gives the
median time per quantizer and per value, by shape (the run of values sharing a per-axis entry is the product of the
dims after axis 1). This sets ``export.onnx.MIN_BLOCK``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from . import harness

SHAPES = [(1, 64, 56, 56), (32, 64, 56, 56), (32, 32, 12, 12), (1, 512, 7, 7), (32, 512), (1, 512)]
CHAIN = 10


def chain(form: str, shape: tuple[int, ...]) -> Any:
    """An ONNX model of ``CHAIN`` quantizers (step 0.01, clip [0, 2], 16-bit container) in ``form``."""
    from onnx import TensorProto, helper, numpy_helper

    size = [shape[1]] if form == "per-axis Q/DQ" else []
    inits = [numpy_helper.from_array(np.full(size, 0.01, np.float32), "s"),
             numpy_helper.from_array(np.full(size, 0, np.uint16), "z"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(2.0, np.float32), "hi")]
    attrs = {"axis": 1} if size else {}
    nodes, value = [], "x"
    for i in range(CHAIN):
        if form == "float form":
            nodes += [helper.make_node("Clip", [value, "lo", "hi"], [f"c{i}"]),
                      helper.make_node("Div", [f"c{i}", "s"], [f"d{i}"]),
                      helper.make_node("Round", [f"d{i}"], [f"r{i}"]),
                      helper.make_node("Mul", [f"r{i}", "s"], [f"y{i}"])]
        else:
            nodes += [helper.make_node("QuantizeLinear", [value, "s", "z"], [f"q{i}"], **attrs),
                      helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"y{i}"], **attrs)]
        value = f"y{i}"
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def measure(threads: int, reps: int) -> list[dict[str, Any]]:
    """Median ms per quantizer and ns per value of each form and shape."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    rows = []
    for shape in SHAPES:
        x = np.random.default_rng(0).random(shape, dtype=np.float32) * 2
        for form in ("per-axis Q/DQ", "per-tensor Q/DQ", "float form"):
            session = onnxruntime.InferenceSession(chain(form, shape).SerializeToString(), options,
                                                   providers=["CPUExecutionProvider"])
            ms = harness.measure(lambda s=session, feed={"x": x}: s.run(None, feed), warmup=3, reps=reps).median / CHAIN
            rows.append({"shape": list(shape), "form": form, "ms": ms, "ns_per_value": ms * 1e6 / x.size})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default="bench_out/onnx_quantizer.json")
    args = parser.parse_args()
    rows = measure(args.threads, args.reps)
    harness.write_json(Path(args.json), {"threads": args.threads, "rows": rows}, "cpu")
    print("| shape | run of values per entry | per-axis Q/DQ [ns/value] | per-tensor Q/DQ [ns/value] | "
          "float form [ns/value] |\n|---|---|---|---|---|")
    for i in range(0, len(rows), 3):
        shape = rows[i]["shape"]
        print(f"| {'×'.join(map(str, shape))} | {int(np.prod(shape[2:]))} | "
              + " | ".join(f"{r['ns_per_value']:.2f}" for r in rows[i:i + 3]) + " |")


if __name__ == "__main__":
    main()

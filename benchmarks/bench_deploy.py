"""Deployment speed and size on the CPU: the PyTorch eval model (masked), the ``pruned`` export, the ``onnx`` export
in a default onnxruntime session, and the float model's own ONNX (through the same ``to_onnx``) in a default session.

    python -m benchmarks.bench_deploy [--checkpoint CKPT] [--zoo resnet18 mobilenet_v2 vit_tiny] [--batch 1 32]
                                      [--threads 1] [--reps 10] [--size 224] [--json F]

A checkpoint is measured as trained; a zoo model (torchvision ResNet-18 / MobileNetV2, timm vit_tiny_patch16_224) is
prepared at 8 bits and given random mixed gates as in the export tests (a third of the quantizers at 4 bits, about
16 % of the prunable channels off). "int8 onnx" is the same export with per-tensor 8-bit activations, which
onnxruntime rewrites into its integer kernels (not exact: it shows what they would gain). "floor" is the same export
with each quantizer replaced by one pass that onnxruntime keeps in its blocked layout and cannot fuse into the
convolution before it (x + x; wrong values, timing only): an exact quantizer rounds, and no float convolution or
matrix product of onnxruntime rounds its output (the integer kernels that do are the int8 column's), so no exact
export of the same graph with float compute takes less time. Every provider runs the same input, taking turns call
by call (`harness.measure_alternating`); the table gives medians in ms and each one's time over the float ONNX's.
Sizes: the files in bytes (the float ONNX, ``pruned``, ``packed`` and ``onnx``). Where the time goes: onnxruntime's
profiler gives the kernel time per op type of our graph and the float graph (runs after the first), summed into
convolutions and matrix products, quantizers (Q/DQ and the float form; a Mul or Div of the model's own, as in
attention, counts there too, in both graphs), layout reorders and the rest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
import torch
from torch import nn

import bayesian_bits as bb
from bayesian_bits.export import FORMATS, load_eval_model, loaded_model, onnxruntime_session
from bayesian_bits.export import onnx as onnx_export
from bayesian_bits.export.loader import Loaded
from bayesian_bits.export.pruned import pruned_model

from . import harness

EIGHT_BIT = {"UINT8": (np.uint8, 0, 255), "INT8": (np.int8, -128, 127)}  # the "int8 onnx" variant's containers
ZOO = {"resnet18": "torchvision:resnet18", "mobilenet_v2": "torchvision:mobilenet_v2",
       "vit_tiny": "timm:vit_tiny_patch16_224"}


def per_tensor(x: Any, scale: float, lo: float, hi: float) -> Any:
    """The "int8 onnx" variant's quantizer: per-tensor Q/DQ (in 8-bit containers where the codes fit)."""
    return onnx_export.qdq_nodes(x, scale, lo, hi, None)


def zoo_case(name: str, size: int) -> tuple[Loaded, nn.Module]:
    """A zoo model prepared at 8 bits with random mixed gates, and its float model."""
    from tests.checks import ZOO_CONFIG, randomize_gates

    torch.manual_seed(0)
    float_model = bb.models.resolve_float_model(ZOO[name], num_classes=1000).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = bb.prepare(float_model, x[:1], ZOO_CONFIG)
    bb.calibrate(model, x)
    randomize_gates(model)
    return loaded_model(model.eval()), float_model


def checkpoint_case(path: str) -> tuple[Loaded, nn.Module]:
    """A trained checkpoint's eval model, and its architecture as a float model (the same weights, unquantized)."""
    loaded = load_eval_model(path)
    options = loaded.options
    float_model = bb.models.resolve_float_model(options["model"], num_classes=bb.experiments.num_classes(options),
                                                in_channels=loaded.input_shape[1]).eval()
    return loaded, float_model


def floor(x: Any, scale: float, lo: float, hi: float) -> Any:
    """The "floor" variant's quantizer: one unfusable pass in onnxruntime's blocked layout (the values are wrong)."""
    from onnxscript import opset21 as op

    return op.Add(x, x)


def variant_onnx(loaded: Loaded, path: Path, translation: Any, containers: dict[str, Any] | None = None) -> None:
    """Our ONNX export with another quantizer translation (and ``containers`` tried before the 16-bit ones), saved
    to ``path``."""
    with mock.patch.object(onnx_export, "qdq_translation", translation), \
            mock.patch.object(onnx_export, "CONTAINERS", (containers or {}) | onnx_export.CONTAINERS):
        onnx.save(onnx_export.onnx_model(loaded)[1], str(path))


GROUPS = {"compute": {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"},
          "quantizers": {"QuantizeLinear", "DequantizeLinear", "Clip", "Div", "Round", "Mul"},
          "reorders": {"ReorderInput", "ReorderOutput"}}


def op_profile(path: Path, feed: dict[str, np.ndarray], threads: int, reps: int) -> dict[str, float]:
    """onnxruntime's kernel time per op type, ms per run, over ``reps`` runs after a first one, in a default session."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.enable_profiling, options.profile_file_prefix = True, str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(reps + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > runs[0]:
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def grouped(profile: dict[str, float]) -> dict[str, float]:
    """A profile summed by ``GROUPS`` (the op types of no group as "other")."""
    out = dict.fromkeys([*GROUPS, "other"], 0.0)
    for op, ms in profile.items():
        out[next((g for g, ops in GROUPS.items() if op in ops), "other")] += ms
    return out


def measure(name: str, loaded: Loaded, float_model: nn.Module, batches: list[int], threads: int,
            reps: int) -> dict[str, Any]:
    """Latencies per batch and file sizes of one case."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = {fmt: Path(tmp) / f"m.{fmt}" for fmt in ("pruned", "packed", "onnx")}
        for fmt, path in files.items():
            FORMATS[fmt](loaded, path)
        files["float onnx"] = Path(tmp) / "float.onnx"
        onnx.save(onnx_export.to_onnx(float_model, loaded.example(2), name), str(files["float onnx"]))
        files["int8 onnx"], files["floor"] = Path(tmp) / "int8.onnx", Path(tmp) / "floor.onnx"
        variant_onnx(loaded, files["int8 onnx"], per_tensor, EIGHT_BIT)
        variant_onnx(loaded, files["floor"], floor)
        sizes = {fmt: path.stat().st_size for fmt, path in files.items()}
        pruned = pruned_model(loaded)
        sessions = {fmt: onnxruntime_session(str(files[fmt]), threads)
                    for fmt in ("onnx", "int8 onnx", "floor", "float onnx")}
        rows, profiles = {}, {}
        for batch in batches:
            x = loaded.example(batch)
            feed = {"input": x.numpy()}
            with torch.no_grad():
                loaded.model(x)  # the eval model quantizes its weights on the first forward
                timings = harness.measure_alternating({
                    "eval": lambda x=x: loaded.model(x), "pruned": lambda x=x: pruned(x),
                    "onnx": lambda feed=feed: sessions["onnx"].run(None, feed),
                    "int8 onnx": lambda feed=feed: sessions["int8 onnx"].run(None, feed),
                    "floor": lambda feed=feed: sessions["floor"].run(None, feed),
                    "float onnx": lambda feed=feed: sessions["float onnx"].run(None, feed)}, warmup=2, reps=reps)
            base = timings["float onnx"].median
            rows[str(batch)] = {k: {"ms": t.median, "vs_float_onnx": t.median / base}
                                for k, t in timings.items()}
            profiles[str(batch)] = {fmt: op_profile(files[fmt], feed, threads, reps) for fmt in ("onnx", "float onnx")}
    return {"model": name, "input": list(loaded.input_shape[1:]), "bytes": sizes, "latency": rows,
            "op_profile": profiles}


def markdown(results: list[dict[str, Any]]) -> str:
    """The BENCHMARKS.md table."""
    out = ["| model | batch | eval [ms] | pruned [ms] | ONNX [ms] | float ONNX [ms] | ONNX / float ONNX | "
           "per-tensor int8 (integer kernels, inexact) / float ONNX | floor / float ONNX |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for batch, row in r["latency"].items():
            out.append(f"| {r['model']} | {batch} | {row['eval']['ms']:.2f} | {row['pruned']['ms']:.2f} | "
                       f"{row['onnx']['ms']:.2f} | {row['float onnx']['ms']:.2f} | "
                       f"**{row['onnx']['vs_float_onnx']:.2f}×** | {row['int8 onnx']['vs_float_onnx']:.2f}× | "
                       f"{row['floor']['vs_float_onnx']:.2f}× |")
    out += ["", "| model | float ONNX | `pruned` | `packed` | `onnx` |", "|---|---|---|---|---|"]
    out += [f"| {r['model']} | " + " | ".join(f"{r['bytes'][k]:,}" for k in ("float onnx", "pruned", "packed", "onnx"))
            + " |" for r in results]
    out += ["", "| model | batch | graph | " + " | ".join(f"{g} [ms]" for g in [*GROUPS, "other"]) + " |",
            "|---|---|---|" + "---|" * (len(GROUPS) + 1)]
    for r in results:
        for batch, profiles in r["op_profile"].items():
            for fmt, profile in profiles.items():
                out.append(f"| {r['model']} | {batch} | {fmt} | "
                           + " | ".join(f"{ms:.2f}" for ms in grouped(profile).values()) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="a trained checkpoint (repeatable)")
    parser.add_argument("--zoo", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--size", type=int, default=224, help="image side of the zoo models")
    parser.add_argument("--json", default="bench_out/deploy.json")
    args = parser.parse_args()
    cases = [(Path(c).name, *checkpoint_case(c)) for c in args.checkpoint]
    cases += [(name, *zoo_case(name, args.size)) for name in args.zoo]
    results = []
    for name, loaded, float_model in cases:
        results.append(measure(name, loaded, float_model, args.batch, args.threads, args.reps))
        print(json.dumps(results[-1]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(Path(args.json), {"threads": args.threads, "results": results}, "cpu")
    print(markdown(results))


if __name__ == "__main__":
    main()

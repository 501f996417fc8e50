"""The ``onnx`` format: the pruned model through PyTorch's own exporter (``torch.onnx.export(dynamo=True)``), with one
translation of ours, the deployed quantizer ``bbkernels::qdq`` → [Clip →] QuantizeLinear → DequantizeLinear.

QuantizeLinear divides by the scale and rounds half to even, as ``bbkernels.deployed`` does, so the graph computes
what the eval model computes up to the rounding inside library kernels (summation order in convolutions and matrix
products, exp, erf, normalisation). The file runs in a default ``onnxruntime.InferenceSession(path)``. onnxruntime
1.32's default optimisers rewrite QDQ graphs in ways that change the values (integer kernels QGemm, MatMulNBits,
MatMulIntegerToFloat and QLinearConv; WeightBiasQuantization of float weights and biases) or fail (Clip→QuantizeLinear
with 4-bit types); activations in 16-bit containers with per-axis scales (`qdq_translation`) meet none of them, so the
graph keeps float compute between its Q/DQ pairs, as the eval model does. Weights are fp32 initializers holding
exactly the grid values (the ``packed`` format stores the codes).

For speed in onnxruntime, with the same values: pruned layers keep channels up to a multiple of ``NCHWC_BLOCK``;
a max pooling that follows a quantizer moves ahead of it (`pool_before_quantizing`); tensors whose per-axis scale
would cover short runs of values (features of a batch of vectors) get the float form of the quantizer instead.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bbkernels import deployed

from .. import checkpoint_io
from ..errors import UsageError
from ..graph.capture import dynamic_dims
from .loader import Loaded
from .pruned import pruned_model

OPSET = 21
# ONNX integer containers of activations: name → (numpy type, lowest, highest value). 16-bit ones only: onnxruntime
# fuses DQ→MatMul with 8-bit types into MatMulIntegerToFloat even for per-axis scales (and then fails), and none of
# its CPU integer kernels takes 16-bit types.
CONTAINERS = {"UINT16": (np.uint16, 0, 65535), "INT16": (np.int16, -32768, 32767)}
# onnxruntime runs a convolution in its blocked layout (MLAS NCHWc, several times faster) only where its channel
# counts divide by the block, 8 with AVX2 and 16 with AVX-512: pruned layers keep channels up to a multiple of 16.
NCHWC_BLOCK = 16
# A per-axis QuantizeLinear → DequantizeLinear costs onnxruntime 1.32 about 0.5 ns per value and 29 ns per run of
# values sharing a scale entry on this project's CPU, the float form Clip → Div → Round → Mul about 1 ns per value
# (BENCHMARKS.md, "Deployment"): per-axis Q/DQ where each entry covers at least this many values.
MIN_BLOCK = 64


def _require(module: str, what: str) -> Any:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the {module} package; pip install 'bayesian-bits[onnx]'")
    return importlib.import_module(module)


def container(codes: tuple[int, int]) -> tuple[str, int]:
    """The container type holding integer codes lo…hi, and the zero point that places them in it (0 where the type
    holds them as they are)."""
    lo, hi = codes
    for name, (_, tmin, tmax) in CONTAINERS.items():
        if hi - lo <= tmax - tmin:
            return name, min(max(0, tmin - lo), tmax - hi)
    raise ValueError(f"codes {lo}…{hi} span more than 16 bits")


def qdq_axis(shape: Any) -> int | None:
    """The axis of a per-axis QuantizeLinear for a tensor of ``shape``: the first non-batch axis of a known size
    above 1 (the channel axis of images; heads or tokens of sequences) if at least ``MIN_BLOCK`` values of known count
    follow each of its entries, else None."""
    dims = list(shape) if shape is not None else []
    for i, d in enumerate(dims[1:], 1):
        if isinstance(d, int) and d > 1:
            rest = dims[i + 1:]
            return i if all(isinstance(r, int) for r in rest) and int(np.prod(rest)) >= MIN_BLOCK else None
    return None


def qdq_translation(x: Any, scale: float, lo: float, hi: float) -> Any:
    """``bbkernels::qdq`` as ONNX: per-axis [Clip →] QuantizeLinear → DequantizeLinear in a 16-bit container (see
    `qdq_nodes`) along `qdq_axis`; Clip → Div → Round → Mul, the same arithmetic in float (Round is half to even),
    where the tensor has no such axis or no 16-bit container holds the grid (a signed 16-bit grid whose fp32 bounds
    reach ±2^15)."""
    axis = qdq_axis(x.shape)
    codes = deployed.codes(scale, lo, hi)
    if axis is not None and codes[1] - codes[0] <= max(tmax - tmin for _, tmin, tmax in CONTAINERS.values()):
        return qdq_nodes(x, scale, lo, hi, axis)
    from onnxscript import opset21 as op

    s = op.Constant(value_float=scale)
    clipped = op.Clip(x, op.Constant(value_float=lo), op.Constant(value_float=hi))
    return op.Mul(op.Round(op.Div(clipped, s)), s)


def qdq_nodes(x: Any, scale: float, lo: float, hi: float, axis: int | None) -> Any:
    """[Clip →] QuantizeLinear → DequantizeLinear in the narrowest of ``CONTAINERS``, with per-axis vectors of equal
    values along ``axis`` (scalars for None). A per-axis scale has the arithmetic of a scalar one, but onnxruntime's
    WeightBiasQuantization (which re-quantizes the float weight and bias of a Conv/Gemm fed by a per-tensor DQ)
    leaves it alone. The Clip is left out where the container saturates at the grid's codes."""
    from onnxscript import opset21 as op

    codes, shape = deployed.codes(scale, lo, hi), x.shape
    name, zero_point = container(codes)
    numpy_type, tmin, tmax = CONTAINERS[name]
    if (tmin - zero_point, tmax - zero_point) != codes:  # the container saturates wider than the clip
        x = op.Clip(x, op.Constant(value_float=lo), op.Constant(value_float=hi))
    size = () if axis is None else (shape[axis],)
    s = op.Constant(value=_ir_tensor(np.full(size, scale, np.float32)))
    z = op.Constant(value=_ir_tensor(np.full(size, zero_point, numpy_type)))
    attrs = {} if axis is None else {"axis": axis}
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z, **attrs), s, z, **attrs)


def _ir_tensor(array: np.ndarray) -> Any:
    import onnx_ir

    return onnx_ir.tensor(array)


class _Logits(nn.Module):
    """A model whose output is a tensor or a Hugging Face output with ``.logits``, returning the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out if isinstance(out, Tensor) else out.logits


MAX_POOLS = (torch.ops.aten.max_pool1d.default, torch.ops.aten.max_pool2d.default, torch.ops.aten.max_pool3d.default)


def pool_before_quantizing(module: torch.fx.GraphModule) -> int:
    """Move each max pooling that reads only a quantizer's output ahead of that quantizer, which then quantizes the
    smaller pooled tensor; the values are the same (max commutes with a non-decreasing map). Returns the moves."""
    graph, moved = module.graph, 0
    for pool in [n for n in graph.nodes if n.target in MAX_POOLS]:
        quantize = pool.args[0]
        if quantize.target is not torch.ops.bbkernels.qdq.default or len(quantize.users) != 1:
            continue
        pool.replace_input_with(quantize, quantize.args[0])
        with graph.inserting_after(pool):
            pooled = graph.call_function(quantize.target, (pool, *quantize.args[1:]))
        pooled.meta = dict(pool.meta)
        pool.replace_all_uses_with(pooled, delete_user_cb=lambda user, pooled=pooled: user is not pooled)
        graph.erase_node(quantize)
        moved += 1
    graph.lint()
    module.recompile()
    return moved


def deployed_program(model: nn.Module, x: Tensor) -> torch.export.ExportedProgram:
    """What `to_onnx` translates: a pruned ``model`` returning logits, captured by ``torch.export`` for inputs like
    ``x`` (dynamic batch), its max poolings moved ahead of quantizers (`pool_before_quantizing`)."""
    with torch.no_grad():
        program = torch.export.export(_Logits(model).eval(), (x,), dynamic_shapes=(dynamic_dims(x),), strict=False)
    pool_before_quantizing(program.graph_module)
    return program


def to_onnx(model: nn.Module, x: Tensor, name: str) -> Any:
    """The ONNX ModelProto of a pruned ``model`` for inputs like ``x`` (batch ≥ 2; the batch size stays dynamic, and
    the token length of integer inputs where the model allows it), checked by ``onnx.checker``."""
    _require("onnxscript", "--format onnx")
    onnx = _require("onnx", "--format onnx")
    with torch.no_grad():
        proto = torch.onnx.export(
            deployed_program(model, x), dynamo=True, opset_version=OPSET, input_names=["input"],
            output_names=["logits"], custom_translation_table={torch.ops.bbkernels.qdq.default: qdq_translation},
            verbose=False).model_proto
    onnx.helper.set_model_props(proto, {"model": name})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def onnx_model(loaded: Loaded) -> tuple[nn.Module, Any]:
    """The pruned PyTorch model and its ONNX ModelProto."""
    pruned = pruned_model(loaded, NCHWC_BLOCK)
    return pruned, to_onnx(pruned, loaded.example(2), loaded.name)  # batch 2: sizes 0, 1 get specialised


def onnxruntime_session(proto_or_path: Any, threads: int = 0) -> Any:
    """A default onnxruntime CPU session (``threads`` 0: onnxruntime chooses) for a ModelProto or a file path."""
    onnxruntime = _require("onnxruntime", "running the ONNX graph")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    model = proto_or_path if isinstance(proto_or_path, (str, Path)) else proto_or_path.SerializeToString()
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnxruntime(proto_or_path: Any, x: Tensor) -> Tensor:
    """Outputs of onnxruntime's CPU provider for input ``x``."""
    session = onnxruntime_session(proto_or_path)
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def export_onnx(loaded: Loaded, out: str | Path) -> str:
    """Write the ONNX graph; the summary gives its size and, with onnxruntime installed, its agreement with the
    PyTorch eval model on a random batch in a default session."""
    _, proto = onnx_model(loaded)
    checkpoint_io.write_atomic(out, lambda fh: fh.write(proto.SerializeToString()))
    summary = f"wrote {out}: {Path(out).stat().st_size:,} bytes, opset {OPSET}; "
    if importlib.util.find_spec("onnxruntime") is None:
        return summary + "onnxruntime not installed, outputs not compared"
    x = loaded.example(8)
    with torch.no_grad():
        expected = _Logits(loaded.model)(x)
    got = run_onnxruntime(out, x)
    diff = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    same = int((got.argmax(-1) == expected.argmax(-1)).reshape(len(x), -1).all(1).sum())
    return summary + (f"onnxruntime (default session) vs PyTorch eval model on 8 inputs: max |Δ| / max |logit| "
                      f"{diff:.2g}, {same}/8 predictions equal")

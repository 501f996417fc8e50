"""The ``onnx`` format: the pruned model as an ONNX QuantizeLinear/DequantizeLinear graph (opset 21).

Every quantized tensor keeps its learned precision: weights are stored as integer initializers (int4/uint4 for
2- and 4-bit, int8/uint8, int16/uint16) with a DequantizeLinear, activations pass Q→DQ at the same storage types.
A 2-bit tensor is stored in 4 bits with a Clip to its 2-bit range before the QuantizeLinear; so is every signed
tensor, whose grid has ±(2^(b−1)−1) codes where the storage type also holds −2^(b−1) (SPEC B §1.5). QDQ computes
``s_b·rint(clip(x)/s_b)``, which the residual chain equals in exact arithmetic (SPEC B §1.6); in fp32 the two can
differ by float rounding, and at 16 bits by one grid step. Where the fp32 rounding of s_b carries a signed clip bound
one code past ±(2^(b−1)−1) (it happens at 4, 8 and 16 bits for some x_max), the zero point shifts by one to hold it,
or the tensor moves to the next wider type if both bounds do. 32-bit tensors are the clipped float value.
Run it with ``onnxruntime_session``, which switches off onnxruntime's QDQ fusions (they mishandle 4-bit types).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from bbkernels.reference import SHRINK

from .. import checkpoint_io
from ..errors import UsageError
from .graph import ADD, RELU, flatten_dims, trace
from .layer import ExportLayer
from .loader import Loaded
from .pruned import pruned_model
from .quant import QuantSpec, TensorQuant

OPSET = 21
# (signed, bits) → ONNX storage type name; 2-bit tensors live in 4-bit storage.
STORAGE = {(True, 2): "INT4", (True, 4): "INT4", (True, 8): "INT8", (True, 16): "INT16",
           (False, 2): "UINT4", (False, 4): "UINT4", (False, 8): "UINT8", (False, 16): "UINT16"}
STORAGE_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT32": 32}
WIDER = {"INT4": "INT8", "INT8": "INT16", "INT16": "INT32", "UINT4": "UINT8", "UINT8": "UINT16"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UsageError("--format onnx needs the onnx package; pip install 'bayesian-bits[onnx]'") from None
    return onnx


def _numpy_dtype(storage: str) -> Any:
    import ml_dtypes  # installed with onnx; numpy has no 4-bit integers

    return {"INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4, "INT8": np.int8, "UINT8": np.uint8,
            "INT16": np.int16, "UINT16": np.uint16, "INT32": np.int32}[storage]


def type_range(storage: str) -> tuple[int, int]:
    """Smallest and largest value of an ONNX integer type."""
    bits = STORAGE_BITS[storage]
    return (0, 2**bits - 1) if storage.startswith("U") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def reachable_codes(spec: QuantSpec) -> tuple[int, int]:
    """The lowest and highest integer code the eval quantizer produces: ±(2^(b−1)−1) or 0…2^b−1 as designed, but
    the fp32 rounding of s_b can carry a signed clip bound one code further, to ±2^(b−1) (SPEC B §1.4–1.5)."""
    lo, hi = clip_bounds(spec)
    beyond = torch.tensor([lo - 1.0, hi + 1.0])
    with torch.no_grad():
        codes = torch.round(TensorQuant(spec)(beyond) / torch.tensor(spec.scale, dtype=torch.float32))
    return int(codes[0]), int(codes[1])


def fit_storage(spec: QuantSpec, first: int, last: int, widest: int) -> tuple[str, int]:
    """The storage type and zero point holding codes first…last: the spec's nominal type, its zero point shifted
    by one where a signed extreme reaches ±2^(b−1), the next wider type (up to ``widest`` bits) where both do;
    past that the codes saturate."""
    storage = STORAGE[(spec.signed, spec.bits)]
    while True:
        tmin, tmax = type_range(storage)
        if last - first <= tmax - tmin:
            return storage, min(max(0, tmin - first), tmax - last)
        wider = WIDER.get(storage)
        if wider is None or STORAGE_BITS[wider] > widest:
            return storage, 0
        storage = wider


def clip_bounds(spec: QuantSpec) -> tuple[float, float]:
    """The clip range of the eval quantizer in fp32: [−x_max', x_max'] or [0, x_max'] (SPEC B §1.4)."""
    xm = float(torch.tensor(spec.x_max, dtype=torch.float32) * torch.tensor(SHRINK, dtype=torch.float32))
    return (-xm if spec.signed else 0.0), xm


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.names: set[str] = set()
        self.storage_counts: dict[str, int] = {}

    def fresh(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        name = self.fresh(name)
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = self.fresh(name)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _scale_zero(self, name: str, spec: QuantSpec, storage: str, zero_point: int) -> list[str]:
        scale = self.const(f"{name}.scale", np.array(spec.scale, np.float32))
        zero = self.const(f"{name}.zero_point", np.array(zero_point, _numpy_dtype(storage)))
        self.storage_counts[storage] = self.storage_counts.get(storage, 0) + 1
        return [scale, zero]

    def quantize(self, x: str, spec: QuantSpec, name: str) -> str:
        """Q→DQ of an activation at its learned precision (Clip alone at 32 bits, nothing for float)."""
        if spec.kind == "float":
            return x
        lo, hi = clip_bounds(spec)
        if spec.bits == 32:
            return self.clip(x, lo, hi, name)
        first, last = reachable_codes(spec)
        storage, zero_point = fit_storage(spec, first, last, widest=16)
        tmin, tmax = type_range(storage)
        if tmin - zero_point < first or tmax - zero_point > last:  # else saturation is the clip
            x = self.clip(x, lo, hi, name)
        qparams = self._scale_zero(name, spec, storage, zero_point)
        q = self.node("QuantizeLinear", [x, *qparams], f"{name}.q")
        return self.node("DequantizeLinear", [q, *qparams], f"{name}.dq")

    def clip(self, x: str, lo: float, hi: float, name: str) -> str:
        bounds = [self.const(f"{name}.{end}", np.array(v, np.float32)) for end, v in (("lo", lo), ("hi", hi))]
        return self.node("Clip", [x, *bounds], f"{name}.clip")

    def weight(self, w: Tensor, spec: QuantSpec | None, name: str) -> str:
        """A weight as integer codes + DequantizeLinear at its learned precision, else as fp32."""
        array = w.detach().numpy().astype(np.float32)
        if spec is None or spec.kind == "float" or spec.bits == 32:
            return self.const(name, array)
        codes = np.rint(array / np.float32(spec.scale)).astype(np.int64)
        first, last = reachable_codes(spec)
        if codes.size and (codes.min() < first or codes.max() > last):
            raise ValueError(f"{name}: weight codes outside the {spec.bits}-bit grid; the checkpoint is inconsistent")
        storage, zero_point = fit_storage(spec, int(codes.min(initial=0)), int(codes.max(initial=0)), widest=32)
        stored = self.const(f"{name}.codes", (codes + zero_point).astype(_numpy_dtype(storage)))
        return self.node("DequantizeLinear", [stored, *self._scale_zero(name, spec, storage, zero_point)], name)

    def activation(self, x: str, act: nn.Module, name: str) -> str:
        if isinstance(act, nn.ReLU):
            return self.node("Relu", [x], f"{name}.relu")
        if isinstance(act, nn.ReLU6):
            return self.clip(x, 0.0, 6.0, f"{name}.relu6")
        raise UsageError(f"{name}: activation {type(act).__name__} has no ONNX export")

    def layer(self, x: str, layer: ExportLayer, name: str) -> str:
        """Conv or Gemm with dequantized weight and fp32 bias, bias map, activation, output Q→DQ."""
        op = layer.op
        w = self.weight(op.weight, layer.weight_quant, f"{name}.weight")
        b = self.const(f"{name}.bias", op.bias.detach().numpy().astype(np.float32))
        if isinstance(op, nn.Conv2d):
            if op.padding_mode != "zeros" or isinstance(op.padding, str):
                raise UsageError(f"{name}: only explicit zero padding is exported")
            ph, pw = op.padding
            y = self.node("Conv", [x, w, b], f"{name}.conv", kernel_shape=list(op.kernel_size),
                          strides=list(op.stride), pads=[ph, pw, ph, pw], dilations=list(op.dilation), group=op.groups)
        else:
            y = self.node("Gemm", [x, w, b], f"{name}.gemm", transB=1)
        if layer.bias_map is not None:
            y = self.node("Add", [y, self.const(f"{name}.bias_map", layer.bias_map.numpy()[None])], f"{name}.add_map")
        if layer.activation is not None:
            y = self.activation(y, layer.activation, name)
        return y if layer.act_quant is None else self.quantize(y, layer.act_quant.spec, f"{name}.act")


def _pair(v: int | tuple[int, int]) -> list[int]:
    return list(v) if isinstance(v, tuple) else [v, v]


def _module_node(b: _Builder, x: str, module: nn.Module, name: str) -> str:
    if isinstance(module, ExportLayer):
        return b.layer(x, module, name)
    if isinstance(module, TensorQuant):
        return b.quantize(x, module.spec, name)
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return b.activation(x, module, name)
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return x
    if isinstance(module, nn.MaxPool2d):
        ph, pw = _pair(module.padding)
        return b.node("MaxPool", [x], name, kernel_shape=_pair(module.kernel_size),
                      strides=_pair(module.stride or module.kernel_size), pads=[ph, pw, ph, pw],
                      dilations=_pair(module.dilation), ceil_mode=int(module.ceil_mode))
    if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
        return b.node("GlobalAveragePool", [x], name)
    raise UsageError(f"{name}: {type(module).__name__} has no ONNX export")


def _function_node(b: _Builder, node: fx.Node, args: list[str]) -> str:
    if node.target in ADD or node.target == "add":
        return b.node("Add", args[:2], node.name)
    if node.target in RELU:
        return b.node("Relu", args[:1], node.name)
    if node.target is F.relu6:
        return b.clip(args[0], 0.0, 6.0, node.name)
    dims = flatten_dims(node)
    if dims is not None and dims[1] == -1:
        return b.node("Flatten", args[:1], node.name, axis=dims[0])
    raise UsageError(f"{node.name}: {node.target} has no ONNX export")


def to_onnx(model: nn.Module, input_shape: tuple[int, ...], num_outputs: int, name: str) -> Any:
    """An ONNX ModelProto of a pruned model (``ExportLayer``/``TensorQuant`` leaves), dynamic batch size."""
    onnx = _onnx()
    b = _Builder()
    values: dict[fx.Node, str] = {}
    output = None
    for node in trace(model).nodes:
        args = [values[a] for a in node.args if isinstance(a, fx.Node) and a in values]
        if node.op == "placeholder":
            values[node] = b.fresh("input")
        elif node.op == "call_module":
            values[node] = _module_node(b, args[0], model.get_submodule(node.target), node.target)
        elif node.op in ("call_function", "call_method"):
            values[node] = _function_node(b, node, args)
        elif node.op == "output":
            output = b.node("Identity", args[:1], "logits")
    T = onnx.TensorProto
    graph = onnx.helper.make_graph(
        b.nodes, name, [onnx.helper.make_tensor_value_info("input", T.FLOAT, ["batch", *input_shape[1:]])],
        [onnx.helper.make_tensor_value_info(output, T.FLOAT, ["batch", num_outputs])], b.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="bayesian-bits")
    onnx.helper.set_model_props(proto, {"model": name} | {f"storage.{k}": str(v)
                                                          for k, v in sorted(b.storage_counts.items())})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def onnx_model(loaded: Loaded) -> tuple[nn.Module, Any]:
    """The pruned PyTorch model and its ONNX QDQ graph."""
    pruned = pruned_model(loaded)
    with torch.no_grad():
        num_outputs = pruned(torch.zeros(loaded.input_shape)).shape[1]
    return pruned, to_onnx(pruned, loaded.input_shape, num_outputs, loaded.name)


def onnxruntime_session(proto_or_path: Any, threads: int = 0) -> Any:
    """An onnxruntime CPU session for an exported graph (a ModelProto or a file path); ``threads`` 0 lets
    onnxruntime choose.

    Its QDQ fusions are switched off (``session.disable_quant_qdq`` and the ``ClipQuantRewrite`` rule):
    onnxruntime 1.32 rewrites DQ→MaxPool→Q and Clip→Q without checking for 4-bit types, then rejects the graph
    it made or stops with "Unexpected data type for QuantizeLinear input y_zero_point".
    """
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("running the ONNX graph needs onnxruntime; pip install 'bayesian-bits[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    model = proto_or_path if isinstance(proto_or_path, (str, Path)) else proto_or_path.SerializeToString()
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=["ClipQuantRewrite"])


def run_onnxruntime(proto_or_path: Any, x: Tensor) -> Tensor:
    """Outputs of onnxruntime's CPU provider for input ``x``."""
    session = onnxruntime_session(proto_or_path)
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def export_onnx(loaded: Loaded, out: str | Path) -> str:
    """Write the ONNX graph; the summary gives its storage types and, with onnxruntime installed, its agreement
    with the PyTorch eval model on a random batch."""
    _, proto = onnx_model(loaded)
    checkpoint_io.write_atomic(out, lambda fh: fh.write(proto.SerializeToString()))
    types = ", ".join(f"{p.value}×{p.key.removeprefix('storage.').lower()}" for p in proto.metadata_props
                      if p.key.startswith("storage."))
    summary = f"wrote {out}: {Path(out).stat().st_size:,} bytes, opset {OPSET}, QDQ storage {types or 'none'}; "
    if importlib.util.find_spec("onnxruntime") is None:
        return summary + "onnxruntime not installed, outputs not compared"
    x = torch.rand(8, *loaded.input_shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(x)
    diff = (run_onnxruntime(proto, x) - expected).abs().max().item()
    return summary + f"onnxruntime vs PyTorch eval model on 8 random inputs: max |Δ| {diff:.3g}"

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

import copy
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from bbkernels.ladder import SHRINK

from .. import checkpoint_io
from ..errors import UsageError
from ..graph import aten as ops
from ..graph.placement import PASS_MODULES
from ..quantizer import Mode
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
        if spec.kind is Mode.FLOAT:
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
        if spec is None or spec.kind is Mode.FLOAT or spec.bits == 32:
            return self.const(name, array)
        codes = np.rint(array / np.float32(spec.scale)).astype(np.int64)
        first, last = reachable_codes(spec)
        if codes.size and (codes.min() < first or codes.max() > last):
            raise ValueError(f"{name}: weight codes outside the {spec.bits}-bit grid; the checkpoint is inconsistent")
        storage, zero_point = fit_storage(spec, int(codes.min(initial=0)), int(codes.max(initial=0)), widest=32)
        stored = self.const(f"{name}.codes", (codes + zero_point).astype(_numpy_dtype(storage)))
        return self.node("DequantizeLinear", [stored, *self._scale_zero(name, spec, storage, zero_point)], name)

    def activation(self, x: str, act: nn.Module, name: str) -> str:
        """A pointwise activation module as ONNX nodes."""
        if isinstance(act, nn.ReLU):
            return self.node("Relu", [x], f"{name}.relu")
        if isinstance(act, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(act, nn.ReLU6) else (act.min_val, act.max_val)
            return self.clip(x, lo, hi, f"{name}.clip")
        if isinstance(act, nn.Sigmoid):
            return self.node("Sigmoid", [x], f"{name}.sigmoid")
        if isinstance(act, nn.Tanh):
            return self.node("Tanh", [x], f"{name}.tanh")
        if isinstance(act, nn.SiLU):
            return self.node("Mul", [x, self.node("Sigmoid", [x], f"{name}.sigmoid")], f"{name}.silu")
        if isinstance(act, nn.Hardswish):
            return self.node("HardSwish", [x], f"{name}.hardswish")
        if isinstance(act, nn.Hardsigmoid):
            return self.node("HardSigmoid", [x], f"{name}.hardsigmoid", alpha=1.0 / 6.0, beta=0.5)
        if isinstance(act, nn.GELU):
            return self.node("Gelu", [x], f"{name}.gelu", approximate=act.approximate)
        if isinstance(act, nn.LeakyReLU):
            return self.node("LeakyRelu", [x], f"{name}.leaky_relu", alpha=act.negative_slope)
        if isinstance(act, nn.ELU):
            return self.node("Elu", [x], f"{name}.elu", alpha=act.alpha)
        raise UsageError(f"{name}: activation {type(act).__name__} has no ONNX export")

    def layer(self, x: str, layer: ExportLayer, name: str, rank: int) -> str:
        """Conv, Gemm or MatMul with dequantized weight and fp32 bias, bias map, activation, output Q→DQ."""
        y = self.dense(x, layer.op, layer.weight_quant, name, rank)
        if layer.bias_map is not None:
            y = self.node("Add", [y, self.const(f"{name}.bias_map", layer.bias_map.numpy()[None])], f"{name}.add_map")
        if layer.activation is not None:
            y = self.activation(y, layer.activation, name)
        return y if layer.act_quant is None else self.quantize(y, layer.act_quant.spec, f"{name}.act")

    def dense(self, x: str, op: nn.Module, weight_quant: QuantSpec | None, name: str, rank: int) -> str:
        """A conv or linear op (with its bias; a float layer's weight stays fp32)."""
        w = self.weight(op.weight, weight_quant, f"{name}.weight")
        bias = op.bias if op.bias is not None else torch.zeros(op.weight.shape[0])
        b = self.const(f"{name}.bias", bias.detach().numpy().astype(np.float32))
        if isinstance(op, (nn.Conv1d, nn.Conv2d)):
            if isinstance(op.padding, str):
                raise UsageError(f"{name}: padding={op.padding!r} has no ONNX export; give the padding explicitly")
            pads = list(op.padding) * 2
            if op.padding_mode != "zeros":
                mode = PAD_MODES[op.padding_mode]
                spatial = [0, 0, *op.padding, 0, 0, *op.padding]
                x = self.node("Pad", [x, self.const(f"{name}.pads", np.array(spatial, np.int64))], f"{name}.pad",
                              mode=mode)
                pads = [0] * len(pads)
            return self.node("Conv", [x, w, b], f"{name}.conv", kernel_shape=list(op.kernel_size),
                             strides=list(op.stride), pads=pads, dilations=list(op.dilation), group=op.groups)
        if rank == 2:
            return self.node("Gemm", [x, w, b], f"{name}.gemm", transB=1)
        wt = self.node("Transpose", [w], f"{name}.weight_t", perm=[1, 0])
        return self.node("Add", [self.node("MatMul", [x, wt], f"{name}.matmul"), b], f"{name}.add_bias")

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.array(values, np.int64))


def _pair(v: int | list[int] | tuple[int, ...], n: int = 2) -> list[int]:
    """An ATen size argument (an int, or a list of one or ``n`` ints) as ``n`` ints."""
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


aten = ops.aten
BINARY = {aten.add.Tensor: "Add", aten.mul.Tensor: "Mul", aten.sub.Tensor: "Sub", aten.div.Tensor: "Div",
          aten.matmul.default: "MatMul", aten.bmm.default: "MatMul", aten.mm.default: "MatMul"}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.unflatten.int}
POOL_OPS = {aten.max_pool1d.default: ("MaxPool", 1), aten.max_pool2d.default: ("MaxPool", 2),
            aten.avg_pool1d.default: ("AveragePool", 1), aten.avg_pool2d.default: ("AveragePool", 2)}
ADAPTIVE = {aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap", "constant": "constant"}


class _Emitter:
    """Walks the fx graph of a pruned model (with shapes from one batch-2 forward) and emits ONNX nodes."""

    def __init__(self, b: _Builder, model: nn.Module, graph: fx.Graph) -> None:
        self.b, self.model, self.graph = b, model, graph
        self.values: dict[fx.Node, Any] = {}

    def value(self, a: Any, name: str) -> str:
        """The ONNX name of an fx argument: a node's value, or a float constant."""
        if isinstance(a, fx.Node) and a in self.values:
            return self.values[a]
        if isinstance(a, fx.Node):  # a Python number computed from shapes
            a = a.meta["constant"]
        return self.b.const(f"{name}.const", np.array(a, np.float32))

    def shape(self, node: fx.Node) -> list[int]:
        return list(node.meta["tensor_meta"].shape)

    def rank(self, node: fx.Node) -> int:
        return len(self.shape(node))

    def module(self, node: fx.Node) -> Any:
        m, x, name = self.model.get_submodule(node.target), self.values[node.args[0]], node.target
        b = self.b
        if isinstance(m, ExportLayer):
            return b.layer(x, m, name, self.rank(node.args[0]))
        if isinstance(m, TensorQuant):
            return b.quantize(x, m.spec, name)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):  # a layer `prepare` was told to skip: float
            return b.dense(x, m, None, name, self.rank(node.args[0]))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # a BN that could not be folded
            stats = [m.weight, m.bias, m.running_mean, m.running_var]
            consts = [b.const(f"{name}.{k}", v.detach().numpy().astype(np.float32))
                      for k, v in zip(("scale", "bias", "mean", "var"), stats, strict=True)]
            return b.node("BatchNormalization", [x, *consts], name, epsilon=m.eps)
        if isinstance(m, PASS_MODULES):  # dropout, stochastic depth: the identity in eval
            return x
        raise UsageError(f"{name}: {type(m).__name__} has no ONNX export")

    def pool(self, op: str, x: str, name: str, dims: int, kernel, stride, padding, dilation, ceil_mode) -> str:
        pads = _pair(padding, dims)
        attrs = {"kernel_shape": _pair(kernel, dims), "strides": _pair(stride or kernel, dims), "pads": pads * 2,
                 "ceil_mode": int(ceil_mode)}
        if op == "MaxPool":
            attrs["dilations"] = _pair(dilation, dims)
        return self.b.node(op, [x], name, **attrs)

    def adaptive_pool(self, node: fx.Node, x: str, name: str) -> str:
        """Adaptive average pooling at the traced sizes: global, an even AveragePool, or nearest upsampling where
        each output bin covers one input element."""
        size_in, size_out = self.shape(node.args[0])[2:], self.shape(node)[2:]
        if all(o == 1 for o in size_out):
            return self.b.node("GlobalAveragePool", [x], name)
        if all(i % o == 0 for i, o in zip(size_in, size_out, strict=True)):
            k = [i // o for i, o in zip(size_in, size_out, strict=True)]
            return self.b.node("AveragePool", [x], name, kernel_shape=k, strides=k)
        if all(o % i == 0 for i, o in zip(size_in, size_out, strict=True)):
            scales = self.b.const(f"{name}.scales", np.array([1, 1, *(o / i for i, o in zip(size_in, size_out,
                                                                                        strict=True))], np.float32))
            return self.b.node("Resize", [x, "", scales], name, mode="nearest")
        raise UsageError(f"{name}: adaptive pooling from {size_in} to {size_out} has no ONNX export; export at an "
                         "input size whose feature maps divide evenly")

    def reshape(self, node: fx.Node, x: str) -> str:
        """A reshape to the traced output shape; a leading batch dimension stays dynamic (0 copies it)."""
        out, source = self.shape(node), self.shape(node.args[0])
        target = [0 if i == 0 and out[0] == source[0] else d for i, d in enumerate(out)]
        return self.b.node("Reshape", [x, self.b.ints(f"{node.name}.shape", target)], node.name)

    def function(self, node: fx.Node) -> Any:
        b, name, args = self.b, node.name, node.args
        target = ops.base_op(node)
        if target in BINARY:
            return b.node(BINARY[target], [self.value(args[0], name), self.value(args[1], name)], name)
        if target in ops.ACTIVATIONS:
            act = ops.ACTIVATIONS[target](*args[1:], **node.kwargs)
            if act is not None:
                return b.activation(self.values[args[0]], act, name)
        x = self.values.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if target in RESHAPES:
            return self.reshape(node, x)
        if target in POOL_OPS:
            op, dims = POOL_OPS[target]
            kernel, stride = ops.arg(node, "kernel_size"), list(ops.arg(node, "stride")) or None
            return self.pool(op, x, name, dims, kernel, stride, ops.arg(node, "padding"),
                             ops.arg(node, "dilation") if op == "MaxPool" else 1, ops.arg(node, "ceil_mode"))
        if target in ADAPTIVE:
            return self.adaptive_pool(node, x, name)
        if target in ops.COPIES:
            return x
        if target in (aten.transpose.int, aten.permute.default, aten.t.default):
            rank = self.rank(args[0])
            if target is aten.permute.default:
                perm = [d % rank for d in args[1]]
            elif target is aten.t.default:
                perm = [1, 0]
            else:
                perm = list(range(rank))
                i, j = args[1] % rank, args[2] % rank
                perm[i], perm[j] = perm[j], perm[i]
            return b.node("Transpose", [x], name, perm=perm)
        if target is aten.mean.dim:
            dims = ops.arg(node, "dim")
            keep = int(ops.arg(node, "keepdim"))
            return b.node("ReduceMean", [x, b.ints(f"{name}.axes", list(dims))], name, keepdims=keep)
        if target is aten.softmax.int:
            return b.node("Softmax", [x], name, axis=ops.arg(node, "dim"))
        if target in ops.JOIN - {aten.stack.default}:
            return b.node("Concat", [self.values[a] for a in args[0]], name, axis=ops.arg(node, "dim"))
        if target in SPLITS:
            return self.split(node)
        if target is aten.layer_norm.default:
            shape = list(ops.arg(node, "normalized_shape"))
            scale, bias = (ops.arg(node, k) for k in ("weight", "bias"))
            ones = None if scale is not None else b.const(f"{name}.scale", np.ones(shape, np.float32))
            inputs = [x, ones or self.values[scale], *([self.values[bias]] if bias is not None else [])]
            return b.node("LayerNormalization", inputs, name, axis=-len(shape), epsilon=ops.arg(node, "eps"))
        if target is aten.pad.default:
            pad, mode = list(ops.arg(node, "pad")), ops.arg(node, "mode")
            rank = self.rank(args[0])
            begin, end = [0] * rank, [0] * rank
            for i in range(len(pad) // 2):  # torch lists the last dimension first
                begin[rank - 1 - i], end[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
            value = ops.arg(node, "value") or 0.0
            fill = [b.const(f"{name}.value", np.array(value, np.float32))] if mode == "constant" else []
            return b.node("Pad", [x, b.ints(f"{name}.pads", begin + end), *fill], name, mode=PAD_MODES[mode])
        if ops.is_getitem(node) and isinstance(self.values.get(args[0]), list):
            return self.values[args[0]][args[1]]
        raise UsageError(f"{name}: {target} has no ONNX export")

    def split(self, node: fx.Node) -> list[str]:
        target, args = ops.base_op(node), node.args
        dim = ops.arg(node, "dim")
        size = self.shape(args[0])[dim]
        if target is aten.chunk.default:
            step = -(-size // args[1])
            sizes = [min(step, size - i) for i in range(0, size, step)]
        elif target is aten.split_with_sizes.default:
            sizes = list(args[1])
        elif target is aten.unbind.int:
            sizes = [1] * size
        else:
            sizes = [min(args[1], size - i) for i in range(0, size, args[1])]
        outs = [self.b.fresh(f"{node.name}_{i}") for i in range(len(sizes))]
        self.b.nodes.append(self.b.onnx.helper.make_node(
            "Split", [self.values[args[0]], self.b.ints(f"{node.name}.sizes", sizes)], outs, name=node.name,
            axis=dim))
        if target is aten.unbind.int:
            axes = self.b.ints(f"{node.name}.axes", [dim])
            return [self.b.node("Squeeze", [out, axes], f"{node.name}_{i}_squeeze") for i, out in enumerate(outs)]
        return outs


class _ShapesAndConstants(ShapeProp):
    """Shape propagation that also records the Python numbers the graph computes (from shapes)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, (int, float)):
            n.meta["constant"] = result
        return result


def to_onnx(model: fx.GraphModule, input_shape: tuple[int, ...], num_outputs: int, name: str) -> Any:
    """An ONNX ModelProto of a pruned model (its graph's ``ExportLayer``/``TensorQuant`` modules and ATen ops),
    dynamic batch size."""
    onnx = _onnx()
    b = _Builder()
    gm = copy.deepcopy(model)
    with torch.no_grad():
        _ShapesAndConstants(gm).propagate(torch.zeros(2, *input_shape[1:]))
    emit = _Emitter(b, model, gm.graph)
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            emit.values[node] = b.fresh("input")
        elif node.op == "get_attr":
            value = functools.reduce(getattr, node.target.split("."), gm)
            emit.values[node] = b.const(node.target, value.detach().numpy().astype(np.float32))
        elif not isinstance(node.meta.get("tensor_meta"), (TensorMetadata, list, tuple)) and node.op != "output":
            continue  # sizes and other Python values: reshapes use the traced shapes
        elif node.op == "call_module":
            emit.values[node] = emit.module(node)
        elif node.op == "call_function":
            emit.values[node] = emit.function(node)
        elif node.op == "output":
            flat = node.args[0]
            if isinstance(flat, (list, tuple)):  # the graph returns its outputs flattened
                if len(flat) != 1:
                    raise UsageError(f"{name} returns {len(flat)} tensors; the ONNX export takes models with one")
                flat = flat[0]
            output = b.node("Identity", [emit.values[flat]], "logits")
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

"""The ATen vocabulary of a captured model: which ops carry MACs, which pass quantized values through, which keep
channel c in channel c, and which pointwise activations a layer can take in.

`torch.export`'s training IR names every op as an ATen overload (`aten.conv2d.default`, `aten.linear.default`,
`aten.scaled_dot_product_attention.default`, ...), whatever module, function or method the model called; these
tables say what an op means to the placement rules (the ONNX export keeps its own table of how each op translates).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch._ops import OpOverload

aten = torch.ops.aten

CONV = {aten.conv1d.default: nn.Conv1d, aten.conv1d.padding: nn.Conv1d, aten.conv2d.default: nn.Conv2d,
        aten.conv2d.padding: nn.Conv2d}
LINEAR = {aten.linear.default}
# Products of two tensors.
MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
ADDMM = {aten.addmm.default, aten.baddbmm.default}  # bias + a @ b: operands at positions 1 and 2
EINSUM = {aten.einsum.default}
ATTENTION = {aten.scaled_dot_product_attention.default}
MAC_OPS = {*CONV, *LINEAR, *MATMUL, *ADDMM, *EINSUM, *ATTENTION}
# MAC-carrying ops Bayesian Bits has no quantized form of: an error unless skipped.
UNSUPPORTED = {aten.conv3d.default: "Conv3d", aten.conv_transpose1d.default: "ConvTranspose1d",
               aten.conv_transpose2d.input: "ConvTranspose2d", aten.conv_transpose3d.input: "ConvTranspose3d",
               aten.convolution.default: "convolution", aten.lstm.input: "LSTM", aten.gru.input: "GRU",
               aten.rnn_tanh.input: "RNN", aten.rnn_relu.input: "RNN", aten.bilinear.default: "Bilinear"}

DROPOUT = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
           aten.feature_alpha_dropout.default}
BATCH_NORM = aten.batch_norm.default
# Checks torch.export writes into the graph for its own guards; a prepared model moves between devices and batch
# sizes, so they go.
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default}

# Ops that pass quantized values through: pooling, means, reshapes and views, selection, padding, concatenation.
PASS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.reshape_as.default,
    aten.view_as.default, aten.flatten.using_ints, aten.unflatten.int, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.expand.default,
    aten.expand_as.default, aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.tensor_split.sections,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.avg_pool1d.default,
    aten.avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.mean.dim, aten.pad.default,
    aten.constant_pad_nd.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
    aten.replication_pad1d.default, aten.replication_pad2d.default, aten.roll.default, aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default, aten.channel_shuffle.default, aten.native_channel_shuffle.default,
    aten.flip.default, aten.repeat.default, aten.repeat_interleave.self_int, aten.cat.default, aten.concat.default,
    aten.stack.default, aten.to.dtype, aten.type_as.default,
}
# Copies that keep values (and may only change the memory layout).
COPIES = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default}
JOIN = {aten.cat.default, aten.concat.default, aten.stack.default}  # inputs are slices of the output
# Ops that keep channel c in channel c (a pruned channel stays the same channel through them).
CHANNEL = {
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.avg_pool1d.default,
    aten.avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.contiguous.default, aten.clone.default,
    aten.alias.default,
}


def _hardtanh(low: float = -1.0, high: float = 1.0) -> nn.Module:
    return nn.ReLU6() if (low, high) == (0.0, 6.0) else nn.Hardtanh(low, high)


def _elu(alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> nn.Module | None:
    return nn.ELU(alpha) if (scale, input_scale) == (1.0, 1.0) else None


# Pointwise activations a layer can take in: the op → the module that computes it (from the op's scalar arguments).
ACTIVATIONS: dict[OpOverload, Callable[..., nn.Module | None]] = {
    aten.relu.default: nn.ReLU, aten.relu6.default: nn.ReLU6, aten.hardtanh.default: _hardtanh,
    aten.hardswish.default: nn.Hardswish, aten.hardsigmoid.default: nn.Hardsigmoid, aten.silu.default: nn.SiLU,
    aten.gelu.default: lambda approximate="none": nn.GELU(approximate), aten.sigmoid.default: nn.Sigmoid,
    aten.tanh.default: nn.Tanh, aten.leaky_relu.default: nn.LeakyReLU, aten.elu.default: _elu,
    aten.mish.default: nn.Mish,
}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
                      nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish)
CHANNEL |= set(ACTIVATIONS)
RELU = aten.relu.default


def out_of_place(op: Any) -> OpOverload | None:
    """The out-of-place twin of an in-place ATen op (`aten.relu_.default` → `aten.relu.default`), else None."""
    if not isinstance(op, OpOverload) or not is_in_place(op):
        return None
    packet = getattr(aten, op._schema.name.split("::")[1].rstrip("_"), None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def is_in_place(op: Any) -> bool:
    """An op that writes into its first argument."""
    if not isinstance(op, OpOverload) or not op._schema.arguments:
        return False
    info = op._schema.arguments[0].alias_info
    return info is not None and info.is_write


def is_view(op: Any) -> bool:
    """An op whose output may share its input's storage (a write into it would reach the input)."""
    return isinstance(op, OpOverload) and (op.is_view or op in PASS - {aten.clone.default, aten.contiguous.default})


def arg(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of an ATen op node, positional, keyword or the schema's default."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if i < len(node.args):
                return node.args[i]
            return a.default_value
    raise KeyError(f"{node.target} has no argument {name!r}")


def base_op(node: fx.Node) -> Any:
    """The node's op with in-place ops read as their out-of-place twins."""
    return out_of_place(node.target) or node.target if node.op == "call_function" else None


def is_op(node: fx.Node, ops: Any) -> bool:
    return node.op == "call_function" and base_op(node) in ops


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem

"""Fused attention as explicit ops, so that both of its matmuls and the attention probabilities are seen.

`scaled_dot_product_attention(q, k, v, mask, p, causal, scale)` becomes

    s = (q @ kᵀ)·scale  (+ mask, or −inf where a boolean mask is False or the causal mask cuts)
    P = dropout_p(softmax(s))
    out = P @ v

with the math of PyTorch's reference implementation (`enable_gqa` repeats the key and value heads). The two
matmuls are MAC ops like any other; P reaches the second one from the softmax, so the placement rule quantizes it
there (before the dropout, which passes quantized values). The price is the memory of P (batch × heads × L × S),
which the fused kernels avoid: the same as PyTorch's math backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, fx, nn

from . import aten as ops
from .modules import free_path, set_module

aten = ops.aten


def causal_fill(scores: Tensor) -> Tensor:
    """``scores`` with −inf above the diagonal of their last two dimensions (top-left aligned, as SDPA's
    ``is_causal``)."""
    rows, cols = scores.shape[-2:]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(keep.logical_not(), float("-inf"))


def repeat_heads(x: Tensor, like: Tensor) -> Tensor:
    """Key or value heads repeated to the query's head count (grouped-query attention)."""
    return x.repeat_interleave(like.size(-3) // x.size(-3), dim=-3)


def split_attention(gm: fx.GraphModule, scope: Callable[[fx.Node], str]) -> None:
    """Replace every `scaled_dot_product_attention` node of ``gm`` by the explicit ops above; a dropout becomes an
    ``nn.Dropout`` at ``scope(node) + 'attention_dropout'``."""
    for node in list(gm.graph.nodes):
        if ops.is_op(node, ops.ATTENTION):
            _split(gm, node, scope(node))


def _split(gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
    graph = gm.graph
    q, k, v = node.args[:3]
    mask, p = ops.arg(node, "attn_mask"), float(ops.arg(node, "dropout_p"))
    causal, scale, gqa = ops.arg(node, "is_causal"), ops.arg(node, "scale"), ops.arg(node, "enable_gqa")
    if scale is None:
        scale = 1.0 / math.sqrt(int(q.meta["val"].shape[-1]))
    stack = dict(node.meta.get("nn_module_stack", {}))

    def add(target, *args, module: bool = False) -> fx.Node:
        new = graph.call_module(target, args) if module else graph.call_function(target, args)
        new.meta["nn_module_stack"] = stack
        return new

    with graph.inserting_before(node):
        if gqa:
            k, v = add(repeat_heads, k, q), add(repeat_heads, v, q)
        scores = add(aten.mul.Tensor, add(aten.matmul.default, q, add(aten.transpose.int, k, -2, -1)), scale)
        if isinstance(mask, fx.Node):
            if mask.meta["val"].dtype == torch.bool:
                scores = add(aten.masked_fill.Scalar, scores, add(aten.logical_not.default, mask), float("-inf"))
            else:
                scores = add(aten.add.Tensor, scores, mask)
        if causal:
            scores = add(causal_fill, scores)
        probs = add(aten.softmax.int, scores, -1)
        if p > 0.0:
            path = free_path(gm, f"{prefix}attention_dropout")
            set_module(gm, path, nn.Dropout(p))
            probs = add(path, probs, module=True)
        out = add(aten.matmul.default, probs, v)
    node.replace_all_uses_with(out)
    graph.erase_node(node)

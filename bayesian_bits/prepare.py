"""`prepare(model, example_inputs, config)`: Bayesian Bits on any model torch.export can capture (SPEC A8, A11).

The model is captured by `graph.capture` (torch.export, ATen ops, the user's module names), rewritten by
`graph.placement` (quantized layers, weight and activation quantizers, the dataflow), then its ReLUs in front of
quantizers are absorbed and its gates move into one gate bank (see ARCHITECTURE.md, "Preparing a model").
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, fx, nn

from . import fold_bank, gate_bank
from .config import QuantConfig
from .graph import aten as ops
from .graph.capture import capture
from .graph.dataflow import ATTRIBUTE, Dataflow
from .graph.placement import FIXED_BITS, Placement, Settings, matches
from .layers import QuantLayer
from .quantizer import BayesianBitsQuantizer, FixedQuantizer, quantizers

__all__ = ["FIXED_BITS", "prepare"]


def _check_overrides(overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must map module-name patterns to settings dicts, got {type(overrides).__name__}")
    known = {f.name for f in fields(Settings)}
    out = {}
    for pattern, values in overrides.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"overrides[{pattern!r}] must be a dict of settings ({', '.join(sorted(known))})")
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"overrides[{pattern!r}]: unknown settings {sorted(unknown)}; use {sorted(known)}")
        for key in ("weight_bits", "act_bits"):
            if key in values and values[key] is not None and values[key] not in FIXED_BITS:
                raise ValueError(f"overrides[{pattern!r}][{key!r}] = {values[key]!r}; use one of {FIXED_BITS} "
                                 "or None (learned gates)")
        if "gamma_inits" in values:
            values = {**values, "gamma_inits": tuple(float(v) for v in values["gamma_inits"])}
            if len(values["gamma_inits"]) != 4:
                raise ValueError(f"overrides[{pattern!r}]['gamma_inits'] needs 4 logits (gamma_4 … gamma_32)")
        out[pattern] = dict(values)
    return out


def _check_patterns_match(model: nn.Module, skip: tuple[str, ...], overrides: Mapping[str, Any]) -> None:
    """A `skip` or `overrides` pattern that matches no module is a ValueError naming the pattern and the nearest
    module names (a typo would otherwise change nothing, silently)."""
    names = [n for n, _ in model.named_modules() if n]
    for kind, pattern in [*(("skip", p) for p in skip), *(("overrides", p) for p in overrides)]:
        if not any(matches(name, (pattern,)) for name in names):
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3) or names[:3]
            raise ValueError(f"{kind} pattern {pattern!r} matches no module of {type(model).__name__}; nearest: "
                             f"{', '.join(near)} (fnmatch patterns, matched against module names and their parents)")


def _example_tuple(example_inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (as torch.export takes them), got "
                        f"{type(example_inputs).__name__}")
    if any(x.dim() == 0 or x.shape[0] < 1 for x in inputs):
        raise ValueError("example_inputs must have a batch dimension first (batch ≥ 1); MACs are counted at batch 1")
    return tuple(x[:1].detach().cpu().clone() for x in inputs)


def prepare(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    config: QuantConfig | None = None,
    *,
    skip: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> fx.GraphModule:
    """A Bayesian Bits copy of float `model` (left untouched): quantized layers, weight and activation quantizers
    and pruning gates placed by the rules of `graph.placement`, and the recorded dataflow for BOPs and export.

    example_inputs: a tensor or tuple of tensors with a batch dimension (their batch-1 slice sets the MACs; the
        prepared model takes any batch size).
    skip: module-name patterns (fnmatch, matched against the module and its parents) whose MAC ops stay float (no
        quantizers; their outputs count as 32-bit inputs).
    overrides: pattern → settings (`Settings` fields: weight_bits, act_bits, prune, gamma_inits), later patterns
        winning; e.g. ``{"conv1": {"weight_bits": 8}, "fc": {"weight_bits": 8}}``.
    Run `calibrate(model, images)` on the result before training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bayesian_bits.QuantConfig, got {type(config).__name__}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    overrides = _check_overrides(overrides)
    inputs = _example_tuple(example_inputs)
    for name, m in model.named_modules():
        if isinstance(m, (QuantLayer, BayesianBitsQuantizer, FixedQuantizer)):
            raise ValueError(f"module {name or type(model).__name__} is already quantized; prepare takes a float "
                             "model (pass the original model, not a prepared one)")
    _check_patterns_match(model, skip, overrides)
    model = _copy(model)
    gm = capture(model, tuple(x.to(_device(model)) for x in inputs))
    place = Placement(gm, model, config, skip, overrides)
    place.check()
    place.fuse_layers(place.logits())
    place.weight_quantizers()
    if not any(kind == "quant" for kind in place.layers.values()) and not any(place.weights.values()):
        raise ValueError(f"{type(model).__name__} has no conv, linear or matmul over a parameter to quantize "
                         "(outside skip)")
    place.place_quantizers()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    regions = place.regions()
    setattr(gm, ATTRIBUTE, Dataflow(place.terms(regions), tuple(place.logit_layers), regions,
                                    tuple(tuple(x.shape) for x in inputs), tuple(x.dtype for x in inputs)))
    _absorb_relus(gm)
    _attach_gate_bank(gm, gm.graph)
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.train()


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; tensors a module caches outside its parameters and buffers (timm LeViT's attention-bias cache,
    filled by an eval forward with gradients on) are copied detached, where deepcopy would refuse them."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            cached = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) \
                else (value,)
            memo.update((id(t), t.detach().clone()) for t in cached if isinstance(t, Tensor) and not t.is_leaf)
    return copy.deepcopy(model, memo)


def _absorb_relus(gm: fx.GraphModule) -> None:
    """A standalone ReLU whose only user is an activation quantizer becomes part of that quantizer (`absorbs_relu`):
    calibrated on its output, the quantizer's grid is unsigned and clips at 0 itself, so the ReLU would change
    neither values nor gradients but cost a kernel each way. (A layer's own ReLU is skipped by the layer.)"""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), BayesianBitsQuantizer):
            continue
        relu = node.args[0]
        if isinstance(relu, fx.Node) and len(relu.users) == 1 and ops.is_op(relu, {ops.RELU}) and \
                len(relu.args) == 1 and not relu.kwargs:
            gm.get_submodule(node.target).absorbs_relu = True
            node.args = (relu.args[0],)
            gm.graph.erase_node(relu)


def _attach_gate_bank(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Move every Bayesian Bits quantizer's gate logits into one `GateBank` (submodule `bb_gates`), the folded layers'
    per-channel arithmetic into one `FoldBank` (`bb_folds`), and run the banks' `begin` first and `end` last in every
    forward (nodes wrapping the first input and the output)."""
    found = [q for _, q in quantizers(gm) if isinstance(q, BayesianBitsQuantizer)]
    if not found:
        return
    bank = gate_bank.merge([(q.bank, q.row) for q in found])
    for row, q in enumerate(found):
        q.join(bank, row)
    gm.add_submodule(gate_bank.ATTRIBUTE, bank)
    layers = [m for m in gm.modules() if isinstance(m, QuantLayer) and m.folds]
    if layers:  # their fold values: a fold bank whose step the gate bank begins
        rows = {}
        for i, layer in enumerate(layers):
            q = layer.weight_quantizer
            if isinstance(q, BayesianBitsQuantizer) and q.bank is bank and bank.specs[q.row].prunes \
                    and bank.sizes[q.row]:
                rows[i] = (bank.starts[q.row], bank.sizes[q.row])
        folds = fold_bank.FoldBank(layers, rows)
        for i, layer in enumerate(layers):
            layer.join_folds(folds, i, i in rows)
        gm.add_submodule(fold_bank.ATTRIBUTE, folds)
        bank.__dict__["folds"] = folds  # a reference: the model owns the fold bank
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(first):
        begin = graph.call_module(gate_bank.ATTRIBUTE, (first, "begin"))
    first.replace_all_uses_with(begin, delete_user_cb=lambda user: user is not begin)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        end = graph.call_module(gate_bank.ATTRIBUTE, (output.args[0], "end"))
    output.args = (end,)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device

"""`prepare(model, example_inputs, config)`: Bayesian Bits on any traceable PyTorch model (SPEC A8).

The model is traced with torch.fx into a graph whose nodes are torch modules and functions; on that graph:

1. every `nn.Conv1d`/`nn.Conv2d`/`nn.Linear` becomes a quantized layer (`layers.quant_layer`) with a weight
   quantizer; a BatchNorm that alone consumes its output is folded into it (§4.3), and a pointwise activation that
   alone consumes the result is attached to it;
2. activation quantizers are placed by one rule: every layer output (after its activation) except the logits
   layer's, and once after every other computed tensor that reaches a layer or matmul input without passing a
   quantizer: walking back from each such input through pass-through ops (pooling, reshapes, concatenation,
   dropout: they keep quantized values), the first computed op found (an add, a multiply, a standalone
   activation or norm) gets a quantizer on its output, which all its users then read. The network input is not
   quantized (it counts as 8-bit). Tensors that only feed a residual add are quantized too but, feeding no layer,
   stay out of BOPs (A1, §4.2);
3. the dataflow is recorded (`dataflow.Dataflow`): per conv/linear/matmul its MACs for one batch-1 forward of the
   example input, the quantizers and pruning masks its input comes from, and the layers whose pruned channels
   export can remove.

Pruning gates go on every weight's output channels except the logits layer's and depthwise convs' (A2).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import io
import math
import operator
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import StochasticDepth

from bbkernels import ladder

from . import gate_bank
from .config import QuantConfig
from .dataflow import ATTRIBUTE, INPUT_BITS, Dataflow, Region, Slice, Term
from .fold_bank import FoldBank
from .layers import QUANT_LAYERS, QuantLayer, quant_layer
from .quantizer import BayesianBitsQuantizer, FixedQuantizer, Mode, quantizers

LAYER_TYPES = tuple(QUANT_LAYERS)
UNSUPPORTED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase, nn.RNNCellBase,
               nn.MultiheadAttention, nn.Bilinear, nn.Transformer, nn.TransformerEncoderLayer,
               nn.TransformerDecoderLayer)

# Pointwise activations that can be attached to a layer: module types, and functions / methods with the module
# that replaces them (extra positional and keyword arguments become the module's, `inplace` is dropped).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
               nn.LeakyReLU, nn.ELU, nn.Mish)
ACTIVATION_FUNCTIONS: dict[Any, type[nn.Module]] = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, F.relu6: nn.ReLU6, F.hardtanh: nn.Hardtanh,
    F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid, F.silu: nn.SiLU, F.gelu: nn.GELU,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid, torch.tanh: nn.Tanh, F.tanh: nn.Tanh,
    "tanh": nn.Tanh, F.leaky_relu: nn.LeakyReLU, F.elu: nn.ELU, F.mish: nn.Mish,
}

# Ops that pass quantized values through (pooling, reshapes, selection, concatenation, dropout).
PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                nn.Flatten, nn.Unflatten, nn.ChannelShuffle, StochasticDepth)
PASS_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                  F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout, torch.flatten,
                  torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.cat,
                  torch.concat, torch.chunk, torch.split, torch.narrow, torch.t, torch.mean, operator.getitem,
                  F.channel_shuffle, torch.channel_shuffle}
PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                "chunk", "split", "narrow", "mean", "t", "expand", "unflatten"}
CAT = {torch.cat, torch.concat}
# Ops that keep channel c in channel c (a pruned channel stays the same channel through them).
CHANNEL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                   StochasticDepth, *ACTIVATIONS, BayesianBitsQuantizer, FixedQuantizer)
CHANNEL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout,
                     *(f for f in ACTIVATION_FUNCTIONS if not isinstance(f, str))}
CHANNEL_METHODS = {m for m in ACTIVATION_FUNCTIONS if isinstance(m, str)} | {"contiguous"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}


@dataclass(frozen=True)
class Settings:
    """Per-module quantization settings, from `QuantConfig` and then `overrides` (matching patterns in order).

    weight_bits / act_bits: a fixed bit width (2, 4, 8, 16 or 32) instead of learned gates, None = gated
    (`act_bits` applies to the layer's output quantizer, or to a quantizer placed after the named op).
    prune: per-output-channel pruning gates on the weight (never on the logits layer or depthwise convs).
    gamma_inits: initial logits (gamma_4, gamma_8, gamma_16, gamma_32) of the gates.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    prune: bool = False
    gamma_inits: tuple[float, float, float, float] = (6.0, 6.0, 6.0, 6.0)


FIXED_BITS = ladder.BITS


def _settings(config: QuantConfig, name: str, overrides: Mapping[str, Mapping[str, Any]]) -> Settings:
    s = Settings(config.weight_fixed_bits, config.act_fixed_bits, config.include_pruning, config.gamma_inits)
    for pattern, values in overrides.items():
        if _matches(name, (pattern,)):
            s = replace(s, **values)
    return s


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
        if not any(_matches(name, (pattern,)) for name in names):
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3) or names[:3]
            raise ValueError(f"{kind} pattern {pattern!r} matches no module of {type(model).__name__}; nearest: "
                             f"{', '.join(near)} (fnmatch patterns, matched against module names and their parents)")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name` or one of its parents matches a pattern (fnmatch syntax)."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(scope, p) for p in patterns for scope in scopes)


class _Tracer(fx.Tracer):
    """Keeps torch's own modules and the user's leaf hints whole; traces through everything else."""

    def __init__(self, leaves: tuple[str | type, ...]) -> None:
        super().__init__()
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = tuple(x for x in leaves if isinstance(x, str))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantLayer, StochasticDepth, *self.leaf_types)) or _matches(qualname, self.leaf_names):
            return True
        return super().is_leaf_module(m, qualname)


def _example_tuple(example_inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (as torch.export takes them), got "
                        f"{type(example_inputs).__name__}")
    if any(x.dim() == 0 or x.shape[0] < 1 for x in inputs):
        raise ValueError("example_inputs must have a batch dimension first (batch ≥ 1); MACs are counted at batch 1")
    return tuple(x[:1].detach().cpu().clone() for x in inputs)


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def activation_module(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """The module a pointwise activation node stands for (a non-in-place copy), or None."""
    m = _module_of(gm, node)
    if m is not None:
        if not isinstance(m, ACTIVATIONS):
            return None
        m = copy.deepcopy(m)
        if getattr(m, "inplace", False):
            m.inplace = False
        return m
    if node.op not in ("call_function", "call_method") or node.target not in ACTIVATION_FUNCTIONS:
        return None
    extra = [a for a in node.args[1:]]
    if any(isinstance(a, fx.Node) for a in extra) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.target in (F.hardtanh, F.leaky_relu, F.elu):  # the last positional argument may be `inplace`
        extra = extra[: {F.hardtanh: 2, F.leaky_relu: 1, F.elu: 1}[node.target]]
    else:
        extra = []
    return ACTIVATION_FUNCTIONS[node.target](*extra, **kwargs)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return found


def _numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return math.prod(meta.shape) if meta is not None and hasattr(meta, "shape") else 0


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _is(node: fx.Node, gm: fx.GraphModule, modules: tuple, functions: set, methods: set) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or \
        (node.op == "call_method" and node.target in MATMUL_METHODS)


def _flatten_to_features(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A flatten of every dimension after the batch: channel c becomes a contiguous block of features."""
    m = _module_of(gm, node)
    if isinstance(m, nn.Flatten):
        return (m.start_dim, m.end_dim) == (1, -1)
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return (start, end) == (1, -1)
    return False


def is_depthwise(layer: nn.Module) -> bool:
    """A conv with one group per input channel (its output channels read one input channel each)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1 and layer.groups == layer.in_channels


def _layer_macs(layer: nn.Module, out: tuple[int, ...]) -> int:
    if isinstance(layer, nn.Linear):
        return math.prod(out) * layer.in_features
    return math.prod(out) * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)


class _Converter:
    """One conversion: the traced float graph, rewritten in place into the prepared one."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, skip: tuple[str, ...],
                 overrides: dict[str, dict[str, Any]]) -> None:
        self.gm, self.graph, self.config, self.skip, self.overrides = gm, gm.graph, config, skip, overrides
        self.layers: dict[fx.Node, str] = {}  # quantized (QuantLayer) and skipped float layer nodes → kind
        self.quantized: dict[fx.Node, str] = {}  # node whose output is quantized → the quantizer's path

    # -- checks -----------------------------------------------------------------------------------------------
    def check_modules(self) -> None:
        calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")
        for node in self.graph.nodes:
            m = _module_of(self.gm, node)
            if m is None or _matches(node.target, self.skip):
                continue
            if isinstance(m, UNSUPPORTED):
                raise ValueError(f"module {node.target} ({type(m).__name__}) cannot be quantized by Bayesian Bits; "
                                 f"leave it float with skip=[{node.target!r}]")
            if not isinstance(m, LAYER_TYPES) and any(isinstance(c, LAYER_TYPES) for c in m.modules()):
                raise ValueError(f"module {node.target} ({type(m).__name__}) is a traced leaf that holds conv/linear "
                                 f"layers, which would stay unquantized; trace into it (drop it from leaf_modules) "
                                 f"or leave it float with skip=[{node.target!r}]")
            if isinstance(m, LAYER_TYPES) and calls[node.target] > 1:
                raise ValueError(f"layer {node.target} is called more than once (shared weights); Bayesian Bits "
                                 f"quantizes each layer once: leave it float with skip=[{node.target!r}]")
            if isinstance(m, LAYER_TYPES) and type(m) not in QUANT_LAYERS:
                raise ValueError(f"module {node.target} is a {type(m).__name__}, a subclass of "
                                 f"{type(m).__mro__[1].__name__} with its own forward; leave it float with "
                                 f"skip=[{node.target!r}]")
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.linear):
                weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if isinstance(weight, fx.Node) and weight.op == "get_attr":
                    raise ValueError(f"op {node.name} calls {node.target.__name__} with a parameter as weight; only "
                                     "nn.Conv1d/nn.Conv2d/nn.Linear modules are quantized: use one, or mark the "
                                     "enclosing module as a leaf (leaf_modules=[...]) and skip it (skip=[...])")

    # -- 1. layers: BN folding, activations, quantizers -----------------------------------------------------------
    def fuse_layers(self, logits: set[fx.Node]) -> None:
        for node in list(self.graph.nodes):
            m = _module_of(self.gm, node)
            if type(m) not in QUANT_LAYERS:
                continue
            if _matches(node.target, self.skip):
                self.layers[node] = "float"
                continue
            fused: list[fx.Node] = []
            user = self._only_user(node)
            bn = None
            if user is not None and self._folds(m, node, user):
                bn = self.gm.get_submodule(user.target)
                fused.append(user)
            last = fused[-1] if fused else node
            user = self._only_user(last)
            act = activation_module(user, self.gm) if user is not None and user.args and user.args[0] is last \
                else None
            if act is not None:
                fused.append(user)
            is_logits = node in logits or any(f in logits for f in fused)
            settings = _settings(self.config, node.target, self.overrides)
            prune = settings.prune and not is_logits and not is_depthwise(m)
            wq = self._quantizer(settings.weight_bits, settings, m.weight.shape[0] if prune else None,
                                 weight=True) if self.config.weight_quant else None
            aq = None if is_logits else self._act_quantizer(settings)
            self._set_module(node.target, quant_layer(m, bn=bn, activation=act, weight_quantizer=wq,
                                                      act_quantizer=aq, bn_fold=self.config.bn_fold))
            if fused:
                node.meta["tensor_meta"] = fused[-1].meta.get("tensor_meta")
                fused[-1].replace_all_uses_with(node)
                for dead in reversed(fused):
                    self.graph.erase_node(dead)
            self.layers[node] = "quant"
            if aq is not None:
                self.quantized[node] = f"{node.target}.act_quantizer"

    def _only_user(self, node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def _folds(self, layer: nn.Module, node: fx.Node, user: fx.Node) -> bool:
        bn = _module_of(self.gm, user)
        if not isinstance(bn, _BatchNorm) or not (bn.affine and bn.track_running_stats):
            return False
        rank = len(_shape(node)) if node.meta.get("tensor_meta") is not None else 0
        if isinstance(layer, nn.Linear) and rank != 2:  # BatchNorm1d normalises dim 1, not the features
            return False
        return bn.num_features == layer.weight.shape[0] and user.args[0] is node and len(user.args) == 1

    def _quantizer(self, bits: int | None, settings: Settings, channels: int | None, *, weight: bool
                   ) -> BayesianBitsQuantizer:
        prune_only = self.config.prune_only and weight and channels is not None
        return BayesianBitsQuantizer(
            channels,
            mode=Mode.FIXED if bits else Mode.FLOAT if prune_only else Mode.GATED,
            fixed_bits=bits,
            prune_only=prune_only,
            gamma_inits=settings.gamma_inits,
            gating_method=self.config.gating_method,
            learn_range=self.config.learned_scale == "range",
        )

    def _act_quantizer(self, settings: Settings) -> BayesianBitsQuantizer | None:
        return self._quantizer(settings.act_bits, settings, None, weight=False) if self.config.quantize_acts else None

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.gm.get_submodule(parent), attr, module)

    # -- 2. activation quantizers of other computed tensors ----------------------------------------------------------
    def mac_inputs(self) -> list[tuple[fx.Node, list[fx.Node]]]:
        """Each MAC-carrying node (layer or matmul) with its data inputs."""
        out = []
        for node in self.graph.nodes:
            if node in self.layers:
                out.append((node, [node.args[0]]))
            elif _is_matmul(node):
                out.append((node, [a for a in node.args[:2] if isinstance(a, fx.Node)]))
        return out

    def _passes(self, node: fx.Node) -> bool:
        return _is(node, self.gm, PASS_MODULES, PASS_FUNCTIONS, PASS_METHODS)

    def sources(self, node: fx.Node, fraction: float = 1.0) -> list[tuple[fx.Node, float]]:
        """Walk back from a MAC input through pass-through ops to the nodes that produce its values, with each
        one's share of the input's elements (concatenation inputs split it)."""
        if node in self.quantized or node in self.layers or node.op in ("placeholder",) or not self._passes(node):
            return [(node, fraction)]
        if node.op == "call_function" and node.target in CAT:
            parts = node.args[0]
            total = sum(_numel(p) for p in parts) or 1
            return [s for p in parts for s in self.sources(p, fraction * _numel(p) / total)]
        return self.sources(node.args[0], fraction)

    def place_quantizers(self) -> None:
        if not self.config.quantize_acts:
            return
        needed: list[fx.Node] = []
        for consumer, inputs in self.mac_inputs():
            if self.layers.get(consumer) == "float":
                continue
            for x in inputs:
                for src, _ in self.sources(x):
                    if src not in self.quantized and src not in self.layers and src.op != "placeholder" \
                            and src not in needed:
                        needed.append(src)
        for src in needed:
            path = self._quantizer_path(src)
            settings = _settings(self.config, path.rpartition(".")[0] or path, self.overrides)
            self.gm.add_submodule(path, self._act_quantizer(settings))
            with self.graph.inserting_after(src):
                q = self.graph.call_module(path, (src,))
            src.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
            q.meta["tensor_meta"] = src.meta.get("tensor_meta")
            self.quantized[q] = path

    def _quantizer_path(self, node: fx.Node) -> str:
        """`<scope>.act_quantizer` for the module whose forward computes `node` (numbered when taken)."""
        stack = list(node.meta.get("nn_module_stack", {}).values())
        scopes = [path for path, _ in stack]
        if node.op == "call_module" and scopes and scopes[-1] == node.target:
            scopes = scopes[:-1]
        scope = scopes[-1] if scopes else ""
        base = f"{scope}.act_quantizer" if scope else "act_quantizer"
        path, i = base, 1
        while self._exists(path):
            path, i = f"{base}_{i}", i + 1
        return path

    def _exists(self, path: str) -> bool:
        try:
            self.gm.get_submodule(path)
        except AttributeError:
            return False
        return True

    # -- 3. the dataflow ------------------------------------------------------------------------------------------
    def slice_of(self, src: fx.Node, fraction: float, consumer: fx.Node, regions: dict[str, Region]) -> Slice:
        """The input slice `src` gives `consumer`; its channels count as pruned only where export removes them
        (the consumer is in the producer's region)."""
        producer = self.mask_source(src)
        region = None if producer is None else next((r for r in regions.values() if producer == r.producer or
                                                     producer in r.passthrough), None)
        mask_from = producer if region is not None and consumer.target in (*region.passthrough, *region.sinks) \
            else None
        path = self.quantized.get(src)
        if path is not None:
            return Slice(path, fraction=fraction, mask_from=mask_from)
        return Slice(None, INPUT_BITS if src.op == "placeholder" else None, fraction, mask_from)

    def mask_source(self, node: fx.Node) -> str | None:
        """The layer whose output channels are this node's channels (through channel-wise ops only), or None."""
        while True:
            if node in self.layers:
                return node.target
            if _is(node, self.gm, CHANNEL_MODULES, CHANNEL_FUNCTIONS, CHANNEL_METHODS) or \
                    _flatten_to_features(node, self.gm):
                node = node.args[0]
                continue
            return None

    def terms(self, regions: dict[str, Region]) -> list[Term]:
        out = []
        for node, inputs in self.mac_inputs():
            slices = [tuple(self.slice_of(s, f, node, regions) for s, f in self.sources(x)) for x in inputs]
            if node not in self.layers:
                k = _shape(inputs[0])[-1]  # the contracted dimension
                out.append(Term(node.name, math.prod(_shape(node)) * k, slices[0], other=slices[1]))
                continue
            layer = self.gm.get_submodule(node.target)
            weight = f"{node.target}.weight_quantizer" if getattr(layer, "weight_quantizer", None) is not None \
                else None
            out.append(Term(node.target, _layer_macs(layer, _shape(node)), slices[0], weight,
                            depthwise=is_depthwise(layer)))
        return out

    def regions(self) -> dict[str, Region]:
        """Layers whose every output path reaches conv/linear inputs through channel-wise ops and depthwise convs."""
        found = {}
        for node, kind in self.layers.items():
            layer = self.gm.get_submodule(node.target)
            if kind != "quant" or getattr(layer, "groups", 1) != 1:  # a grouped conv keeps its group structure
                continue
            passthrough, sinks, frontier, ok = [], [], list(node.users), True
            while frontier and ok:
                user = frontier.pop()
                target = self.gm.get_submodule(user.target) if user in self.layers else None
                if target is not None:
                    if is_depthwise(target):
                        passthrough.append(user.target)
                        frontier.extend(user.users)
                    elif isinstance(target, nn.Linear) or target.groups == 1:
                        sinks.append(user.target)
                    else:
                        ok = False
                elif _is(user, self.gm, CHANNEL_MODULES, CHANNEL_FUNCTIONS, CHANNEL_METHODS) or \
                        _flatten_to_features(user, self.gm):
                    frontier.extend(user.users)
                else:
                    ok = False
            if ok and sinks:
                found[node.target] = Region(node.target, tuple(passthrough), tuple(sinks))
        return found


def _logits(graph: fx.Graph, gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes producing the model's output(s), found by walking back through single-input ops to a layer."""
    found: set[fx.Node] = set()
    output = next(n for n in graph.nodes if n.op == "output")
    for node in _tensor_args(output):
        while node.op != "placeholder":
            if type(_module_of(gm, node)) in QUANT_LAYERS:
                found.add(node)
                break
            args = _tensor_args(node)
            if len(args) != 1:
                break
            node = args[0]
    return found


def prepare(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    config: QuantConfig | None = None,
    *,
    skip: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
) -> fx.GraphModule:
    """A Bayesian Bits copy of float `model` (left untouched): quantized layers, activation quantizers and pruning
    gates placed by the rules of this module's docstring, and the recorded dataflow for BOPs and export.

    example_inputs: a tensor or tuple of tensors with a batch dimension (their batch-1 slice sets the MACs).
    skip: module-name patterns (fnmatch, matched against the module and its parents) whose conv/linear layers stay
        float (no quantizers; their outputs count as 32-bit inputs).
    overrides: pattern → settings (`Settings` fields: weight_bits, act_bits, prune, gamma_inits), later patterns
        winning; e.g. ``{"conv1": {"weight_bits": 8}, "fc": {"weight_bits": 8}}``.
    leaf_modules: module names (patterns) or types that torch.fx must not trace into (untraceable code); they may
        hold no conv/linear layers unless they are also skipped.
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
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer(tuple(leaf_modules)).trace(model)
    except Exception as err:
        raise ValueError(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. Mark the "
                         "untraceable submodule as a leaf (leaf_modules=['name']) and, if it holds conv/linear "
                         "layers, skip it (skip=['name'])") from err
    gm = fx.GraphModule(model, graph, type(model).__name__)
    printed = io.StringIO()  # ShapeProp prints the traceback of a failing node before raising its own error
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(gm).propagate(*(x.to(_device(model)) for x in inputs))
    except Exception as err:
        cause = err.__cause__ or err  # the model's own error, not ShapeProp's wrapper with the node's metadata
        raise ValueError(f"the example inputs do not run through {type(model).__name__}: {type(cause).__name__}: "
                         f"{cause}") from err
    sys.stderr.write(printed.getvalue())  # what the model itself printed on a successful run
    conv = _Converter(gm, config, skip, overrides)
    conv.check_modules()
    logits = _logits(graph, gm)
    conv.fuse_layers(logits)
    if not any(kind == "quant" for kind in conv.layers.values()):
        raise ValueError(f"{type(model).__name__} has no nn.Conv1d/nn.Conv2d/nn.Linear layer to quantize "
                         "(outside skip)")
    conv.place_quantizers()
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    regions = conv.regions()
    flow = Dataflow(conv.terms(regions), tuple(n.target for n in logits), regions,
                    tuple(tuple(x.shape) for x in inputs))
    setattr(gm, ATTRIBUTE, flow)
    gm.bb_example_inputs = inputs
    _absorb_relus(gm, graph)
    gm.recompile()
    gm.delete_all_unused_submodules()
    _attach_gate_bank(gm, graph)
    gm.recompile()
    return gm.train()


def _absorb_relus(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """A standalone ReLU whose only user is an activation quantizer becomes part of that quantizer (`absorbs_relu`):
    calibrated on its output, the quantizer's grid is unsigned and clips at 0 itself, so the ReLU would change
    neither values nor gradients but cost a kernel each way. (A layer's own ReLU is skipped by the layer.)"""
    for node in list(graph.nodes):
        q = _module_of(gm, node)
        if not isinstance(q, BayesianBitsQuantizer) or len(node.args) != 1:
            continue
        relu = node.args[0]
        if not isinstance(relu, fx.Node) or len(relu.users) != 1 or not _is_plain_relu(relu, gm):
            continue
        q.absorbs_relu = True
        node.args = (relu.args[0],)
        graph.erase_node(relu)


def _is_plain_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    module = _module_of(gm, node)
    if module is not None:
        return type(module) is nn.ReLU
    extra = [a for a in node.args[1:] if a is not False] + [v for k, v in node.kwargs.items() if k != "inplace"]
    return node.op in ("call_function", "call_method") and node.target in (F.relu, torch.relu, "relu") and \
        bool(node.args) and isinstance(node.args[0], fx.Node) and not extra


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
        folds = FoldBank(layers, rows)
        for i, layer in enumerate(layers):
            layer.join_folds(folds, i, i in rows)
        gm.add_submodule(gate_bank.FOLDS, folds)
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


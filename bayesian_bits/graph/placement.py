"""Placement: the captured float graph rewritten in place into the Bayesian Bits one (SPEC A8, A11).

1. every conv/linear op whose weight is an `nn.Conv1d`/`nn.Conv2d`/`nn.Linear` module's own (a subclass included)
   becomes a quantized layer (`layers.quant_layer`) at that module's path; a BatchNorm that alone consumes its output
   is folded into it (§4.3), then a pointwise activation that alone consumes the result is attached;
2. any other MAC-carrying op (a linear or conv over another parameter, matmul/bmm/mm, addmm, einsum, both matmuls
   of attention) keeps its ATen op; an operand that is a parameter (through views) gets a weight quantizer on it;
3. activation quantizers are placed by one rule: every layer output (after its activation) except the logits
   layer's, and once after every other computed tensor that reaches a MAC input without passing a quantizer:
   walking back from each such input through ops that pass quantized values (`aten.PASS`: pooling, views and
   reshapes, selection, concatenation; the dropout modules of `PASS_MODULES`), the first computed op found gets
   a quantizer on its output, which all its users then read. The network input is not quantized (it counts as
   8-bit);
4. the dataflow is recorded (`dataflow.Dataflow`).

A MAC op inside a skipped module stays float and is counted at 32 bits.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torchvision.ops import StochasticDepth

from bbkernels import ladder

from ..config import QuantConfig
from ..layers import quant_layer
from ..quantizer import BayesianBitsQuantizer, FixedQuantizer, Mode
from . import aten as ops
from .dataflow import INPUT_BITS, Region, Slice, Term
from .modules import drop_unread_attributes, free_path, has, module_path, node_meta, numbered, scope, set_module

FIXED_BITS = ladder.BITS
QUANTIZERS = (BayesianBitsQuantizer, FixedQuantizer)
# Modules `capture` calls that pass quantized values through, and keep channel c in channel c.
PASS_MODULES = (_DropoutNd, StochasticDepth)


@dataclass(frozen=True)
class Settings:
    """Per-module quantization settings, from `QuantConfig` and then `overrides` (matching patterns in order).

    weight_bits / act_bits: a fixed bit width (2, 4, 8, 16 or 32) instead of learned gates, None = gated
    (`act_bits` applies to the layer's output quantizer, or to a quantizer placed after an op of the module).
    prune: per-output-channel pruning gates on the weight (never on the logits layer or depthwise convs).
    gamma_inits: initial logits (gamma_4, gamma_8, gamma_16, gamma_32) of the gates.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    prune: bool = False
    gamma_inits: tuple[float, float, float, float] = (6.0, 6.0, 6.0, 6.0)


def settings(config: QuantConfig, name: str, overrides: Mapping[str, Mapping[str, Any]]) -> Settings:
    s = Settings(config.weight_fixed_bits, config.act_fixed_bits, config.include_pruning, config.gamma_inits)
    for pattern, values in overrides.items():
        if matches(name, (pattern,)):
            s = replace(s, **values)
    return s


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name` or one of its parents matches a pattern (fnmatch syntax)."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in scopes)


def is_depthwise(layer: nn.Module) -> bool:
    """A conv with one group per input channel (its output channels read one input channel each)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1 and layer.groups == layer.in_channels


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return math.prod(meta.shape) if meta is not None and hasattr(meta, "shape") else 0


def _layer_macs(layer: nn.Module, out: tuple[int, ...]) -> int:
    if isinstance(layer, nn.Linear):
        return math.prod(out) * layer.in_features
    return math.prod(out) * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)


def _einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """The product of the sizes of every index of a two-operand einsum (``...`` included)."""
    sizes: dict[str, int] = {}
    for spec, shape in zip("".join(equation.split()).split("->")[0].split(","), shapes, strict=True):
        if "..." in spec:
            head, tail = spec.split("...")
            middle = len(shape) - len(head) - len(tail)
            spec = head + "".join(chr(0x100 + i) for i in range(middle)) + tail  # ellipsis dims, right-aligned
            shape = shape[: len(head)] + shape[len(head): len(head) + middle] + shape[len(shape) - len(tail):]
        for letter, size in zip(spec, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values())


def _float_layer(node: fx.Node, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    """The torch conv/linear that computes a conv/linear op node with these parameters (its options from the node)."""
    if ops.is_op(node, ops.LINEAR):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        cls = ops.CONV[node.target]
        layer = cls(weight.shape[1] * ops.arg(node, "groups"), weight.shape[0], tuple(weight.shape[2:]),
                    stride=ops.arg(node, "stride"), padding=ops.arg(node, "padding"),
                    dilation=ops.arg(node, "dilation"), groups=ops.arg(node, "groups"), bias=bias is not None,
                    device="meta")
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


class Placement:
    """One conversion: the captured float graph of ``gm`` (``model``: the module objects it came from)."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, config: QuantConfig, skip: tuple[str, ...],
                 overrides: dict[str, dict[str, Any]]) -> None:
        self.gm, self.graph, self.model, self.config = gm, gm.graph, model, config
        self.skip, self.overrides = skip, overrides
        self.layers: dict[fx.Node, str] = {}  # conv/linear module nodes → "quant" | "float"
        self.quantized: dict[fx.Node, str] = {}  # node whose output is quantized → the quantizer's path
        self.weights: dict[fx.Node, str | None] = {}  # other MAC op with a parameter operand → its weight quantizer
        self.names: dict[fx.Node, str] = {}  # MAC op node (not a layer) → its name in the dataflow
        self.parameter_operands: dict[fx.Node, set[int]] = {}  # MAC op node (not a layer) → operands that are weights
        self.logit_layers: list[str] = []
        self.params = dict(gm.named_parameters(remove_duplicate=False))

    # -- what each MAC op is ---------------------------------------------------------------------------------
    def _param(self, node: Any) -> nn.Parameter | None:
        return self.params.get(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None

    def _module_layer(self, node: fx.Node) -> str | None:
        """The path of the Conv/Linear module whose own weight (and bias, if any) a conv/linear op node uses (the
        module that called it, else the parameter's owner), or None: an op over a computed weight or bias is an op
        like any other."""
        if not ops.is_op(node, {*ops.CONV, *ops.LINEAR}):
            return None
        weight_node, bias = ops.arg(node, "weight"), ops.arg(node, "bias")
        weight = self._param(weight_node)
        if weight is None or (bias is not None and self._param(bias) is None):
            return None
        kind = nn.Linear if ops.is_op(node, ops.LINEAR) else ops.CONV[node.target]
        for path in (module_path(node), weight_node.target.rpartition(".")[0]):
            m = self.model.get_submodule(path) if has(self.model, path) else None
            if isinstance(m, kind) and m.weight is weight:
                return path
        return None

    def _skipped(self, path: str) -> bool:
        return matches(path, self.skip)

    def check(self) -> None:
        """MAC ops without a quantized form, and layers whose weight serves several ops, are errors unless skipped."""
        seen: set[int] = set()
        for node in self.graph.nodes:
            path = module_path(node)
            if ops.is_op(node, ops.UNSUPPORTED) and not self._skipped(path):
                where = f"module {path}" if path else "the model's forward"
                raise ValueError(f"{where} computes {ops.UNSUPPORTED[ops.base_op(node)]} ({node.target}), which "
                                 f"Bayesian Bits cannot quantize; leave it float with skip=[{path or '*'!r}]")
            layer = self._module_layer(node)
            if layer is None or self._skipped(layer):
                continue
            weight = id(self._param(ops.arg(node, "weight")))
            if weight in seen:
                raise ValueError(f"layer {layer} is called more than once (shared weights); Bayesian Bits "
                                 f"quantizes each layer once: leave it float with skip=[{layer!r}]")
            seen.add(weight)

    # -- 1. layers: BN folding, activations, quantizers -----------------------------------------------------
    def fuse_layers(self, logits: set[fx.Node]) -> None:
        for node in list(self.graph.nodes):
            path = self._module_layer(node)
            if path is None:
                continue
            float_layer = _float_layer(node, self._param(ops.arg(node, "weight")), self._param(ops.arg(node, "bias")))
            layer_node = self._call(path, node)
            if self._skipped(path):
                set_module(self.gm, path, float_layer)
                self.layers[layer_node] = "float"
                continue
            fused: list[fx.Node] = []
            user = self._only_user(layer_node)
            bn = None
            if user is not None and self._folds(float_layer, layer_node, user):
                bn = self.gm.get_submodule(user.target)
                fused.append(user)
            last = fused[-1] if fused else layer_node
            user = self._only_user(last)
            act = self._activation(user) if user is not None and user.args and user.args[0] is last else None
            if act is not None:
                fused.append(user)
            is_logits = node in logits
            if is_logits:
                self.logit_layers.append(path)
            s = settings(self.config, path, self.overrides)
            prune = s.prune and not is_logits and not is_depthwise(float_layer)
            wq = self._quantizer(s.weight_bits, s, float_layer.weight.shape[0] if prune else None,
                                 weight=True) if self.config.weight_quant else None
            aq = None if is_logits else self._act_quantizer(s)
            set_module(self.gm, path, quant_layer(float_layer, bn=bn, activation=act, weight_quantizer=wq,
                                                  act_quantizer=aq, bn_fold=self.config.bn_fold))
            if fused:
                layer_node.meta["tensor_meta"] = fused[-1].meta.get("tensor_meta")
                fused[-1].replace_all_uses_with(layer_node)
                for dead in reversed(fused):
                    self.graph.erase_node(dead)
            self.layers[layer_node] = "quant"
            if aq is not None:
                self.quantized[layer_node] = f"{path}.act_quantizer"

    def _call(self, path: str, node: fx.Node) -> fx.Node:
        """Replace conv/linear op ``node`` by ``call_module(path)`` on its input."""
        with self.graph.inserting_after(node):
            call = self.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        self.graph.erase_node(node)
        drop_unread_attributes(self.graph)
        return call

    def _only_user(self, node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def _folds(self, layer: nn.Module, node: fx.Node, user: fx.Node) -> bool:
        if user.op != "call_module":
            return False
        bn = self.gm.get_submodule(user.target)
        if not isinstance(bn, _BatchNorm) or not (bn.affine and bn.track_running_stats):
            return False
        if isinstance(layer, nn.Linear) and len(_shape(node)) != 2:  # BatchNorm1d normalises dim 1, not features
            return False
        return bn.num_features == layer.weight.shape[0] and user.args[0] is node and len(user.args) == 1

    def _activation(self, node: fx.Node) -> nn.Module | None:
        """The module computing pointwise activation op ``node`` (the model's own where it called one), or None."""
        if node.op != "call_function" or ops.base_op(node) not in ops.ACTIVATIONS:
            return None
        scalars = [*node.args[1:], *node.kwargs.values()]
        if any(isinstance(a, fx.Node) for a in scalars):
            return None
        path = module_path(node)
        own = self.model.get_submodule(path) if path else None
        if isinstance(own, ops.ACTIVATION_MODULES):
            own = copy.deepcopy(own)
            if getattr(own, "inplace", False):
                own.inplace = False
            return own
        return ops.ACTIVATIONS[ops.base_op(node)](*node.args[1:], **node.kwargs)

    def _quantizer(self, bits: int | None, s: Settings, channels: int | None, *, weight: bool
                   ) -> BayesianBitsQuantizer:
        prune_only = self.config.prune_only and weight and channels is not None
        return BayesianBitsQuantizer(
            channels,
            mode=Mode.FIXED if bits else Mode.FLOAT if prune_only else Mode.GATED,
            fixed_bits=bits,
            prune_only=prune_only,
            gamma_inits=s.gamma_inits,
            gating_method=self.config.gating_method,
            learn_range=self.config.learned_scale == "range",
        )

    def _act_quantizer(self, s: Settings) -> BayesianBitsQuantizer | None:
        return self._quantizer(s.act_bits, s, None, weight=False) if self.config.quantize_acts else None

    # -- 2. the other MAC ops and their parameter operands --------------------------------------------------------
    def operands(self, node: fx.Node) -> list[fx.Node] | None:
        """The tensor operands of a MAC op node (a layer: its input), or None for any other node."""
        if node in self.layers:
            return [node.args[0]]
        if ops.is_op(node, {*ops.CONV, *ops.LINEAR}):
            return [node.args[0], ops.arg(node, "weight")]
        if ops.is_op(node, ops.MATMUL):
            return list(node.args[:2])
        if ops.is_op(node, ops.ADDMM):
            return list(node.args[1:3])
        if ops.is_op(node, ops.EINSUM) and len(node.args[1]) == 2:
            return list(node.args[1])
        return None

    def _is_parameter(self, node: fx.Node) -> str | None:
        """The parameter a MAC operand is (through views), or None."""
        sources = self.sources(node)
        if len(sources) == 1 and sources[0][0].op == "get_attr" and self._param(sources[0][0]) is not None:
            return sources[0][0].target
        return None

    def weight_quantizers(self) -> None:
        """Name every MAC op that is not a layer; quantize its parameter operand (a weight quantizer per use)."""
        for node in list(self.graph.nodes):
            operands = self.operands(node)
            if operands is None or node in self.layers:
                continue
            path = module_path(node)
            op_name = str(ops.base_op(node)).split(".")[1]
            self.names[node] = numbered(f"{scope(path, self.model)}{op_name}", set(self.names.values()).__contains__)
            self.weights[node] = None
            self.parameter_operands[node] = set()
            for i, operand in enumerate(operands):
                param = self._is_parameter(operand)
                if param is None:
                    continue
                self.parameter_operands[node].add(i)
                if self._skipped(path) or not self.config.weight_quant:
                    continue
                owner = param.rpartition(".")[0]
                q_path = free_path(self.gm, f"{param}_quantizer")
                s = settings(self.config, owner or path, self.overrides)
                self.gm.add_submodule(q_path, self._quantizer(s.weight_bits, s, None, weight=True))
                with self.graph.inserting_before(node):
                    q = self.graph.call_module(q_path, (operand,))
                q.meta = node_meta(operand)
                node.replace_input_with(operand, q)
                self.quantized[q] = q_path
                self.weights[node] = q_path

    # -- 3. activation quantizers of other computed tensors ----------------------------------------------------
    def mac_inputs(self) -> list[tuple[fx.Node, list[fx.Node]]]:
        """Each MAC op with its activation operands (parameters and their quantizers left out)."""
        return [(node, [x for i, x in enumerate(self.operands(node)) if i not in self.parameter_operands.get(node, ())])
                for node in self.graph.nodes if node in self.layers or node in self.parameter_operands]

    def _passes(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), PASS_MODULES)
        if ops.is_getitem(node):
            return isinstance(node.args[0], fx.Node) and self._passes(node.args[0])
        return ops.is_op(node, ops.PASS)

    def sources(self, node: fx.Node, fraction: float = 1.0) -> list[tuple[fx.Node, float]]:
        """Walk back from a MAC input through pass-through ops to the nodes that produce its values, with each
        one's share of the input's elements (concatenation inputs split it)."""
        if node in self.quantized or node in self.layers or node.op in ("placeholder", "get_attr") or \
                not self._passes(node):
            return [(node, fraction)]
        if ops.is_op(node, ops.JOIN):
            parts = [p for p in node.args[0] if isinstance(p, fx.Node)]
            total = sum(_numel(p) for p in parts) or 1
            return [s for p in parts for s in self.sources(p, fraction * _numel(p) / total)]
        return self.sources(node.args[0], fraction)

    def place_quantizers(self) -> None:
        if not self.config.quantize_acts:
            return
        needed: list[fx.Node] = []
        for consumer, inputs in self.mac_inputs():
            if self.layers.get(consumer) == "float" or (consumer in self.names and
                                                         self._skipped(module_path(consumer))):
                continue
            for x in inputs:
                for src, _ in self.sources(x):
                    if src not in self.quantized and src not in self.layers and src.op != "placeholder" \
                            and src not in needed:
                        needed.append(src)
        for src in needed:
            path = self._quantizer_path(src)
            s = settings(self.config, path.rpartition(".")[0] or path, self.overrides)
            self.gm.add_submodule(path, self._act_quantizer(s))
            with self.graph.inserting_after(src):
                q = self.graph.call_module(path, (src,))
            src.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
            q.meta = node_meta(src)
            self.quantized[q] = path

    def _quantizer_path(self, node: fx.Node) -> str:
        """`<scope>.act_quantizer` for the module whose forward computes `node` (numbered when taken)."""
        if node.op in ("call_module", "get_attr"):  # a module's output or a parameter: named after its owner
            owner = node.target.rpartition(".")[0]
            return free_path(self.gm, f"{owner}.act_quantizer" if owner else "act_quantizer")
        return free_path(self.gm, f"{scope(module_path(node), self.model)}act_quantizer")

    # -- 4. the dataflow ----------------------------------------------------------------------------------------
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

    def _channel_wise(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), (*PASS_MODULES, *QUANTIZERS))
        return ops.is_op(node, ops.CHANNEL) or self._flatten_to_features(node)

    def _flatten_to_features(self, node: fx.Node) -> bool:
        """A flatten of every dimension after the batch: channel c becomes a contiguous block of features."""
        return ops.is_op(node, {ops.aten.flatten.using_ints}) and \
            (ops.arg(node, "start_dim"), ops.arg(node, "end_dim")) == (1, -1)

    def mask_source(self, node: fx.Node) -> str | None:
        """The layer whose output channels are this node's channels (through channel-wise ops only), or None."""
        while True:
            if node in self.layers:
                return node.target
            if self._channel_wise(node):
                node = node.args[0]
                continue
            return None

    def terms(self, regions: dict[str, Region]) -> list[Term]:
        out = []
        for node, inputs in self.mac_inputs():
            slices = [tuple(self.slice_of(s, f, node, regions) for s, f in self.sources(x)) for x in inputs]
            if node in self.layers:
                layer = self.gm.get_submodule(node.target)
                weight = f"{node.target}.weight_quantizer" if getattr(layer, "weight_quantizer", None) is not None \
                    else None
                out.append(Term(node.target, _layer_macs(layer, _shape(node)), slices[0], weight,
                                depthwise=is_depthwise(layer), layer=True))
                continue
            macs = self._op_macs(node)
            weight = self.weights.get(node)
            if len(slices) == 2:
                out.append(Term(self.names[node], macs, slices[0], other=slices[1]))
            else:  # one operand is a parameter: weight quantizer or float weight
                out.append(Term(self.names[node], macs, slices[0], weight))
        return out

    def _op_macs(self, node: fx.Node) -> int:
        if ops.is_op(node, ops.EINSUM):
            return _einsum_macs(node.args[0], [_shape(x) for x in node.args[1]])
        if ops.is_op(node, {*ops.CONV, *ops.LINEAR}):
            weight = _shape(ops.arg(node, "weight"))
            return math.prod(_shape(node)) * math.prod(weight[1:])
        a = self.operands(node)[0]
        return math.prod(_shape(node)) * _shape(a)[-1]

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
                elif self._channel_wise(user):
                    frontier.extend(user.users)
                else:
                    ok = False
            if ok and sinks:
                found[node.target] = Region(node.target, tuple(passthrough), tuple(sinks))
        return found

    def logits(self) -> set[fx.Node]:
        """Conv/linear op nodes producing the model's output(s), found by walking back from the outputs through
        single-input ops."""
        found: set[fx.Node] = set()
        output = next(n for n in self.graph.nodes if n.op == "output")
        for node in output.all_input_nodes:
            while node.op not in ("placeholder", "get_attr"):
                if self._module_layer(node) is not None:
                    found.add(node)
                    break
                args = [a for a in node.all_input_nodes if a.op != "get_attr"]
                if len(args) != 1:
                    break
                node = args[0]
        return found

"""The ``pruned`` format: a float eval model with pruned output channels physically removed (SPEC A7).

The file holds tensors and plain data only (the layers' pruned weights, biases and kept channels, the quantizer
specs, and the training options the model's structure is rebuilt from) with a digest; ``load_pruned`` rebuilds
the model with ``weights_only=True`` loading, so no code is unpickled.

Each conv/linear becomes an ``ExportLayer``: BN folded, the weight fake-quantized once at its eval bit width,
pruned output channels and the matching input channels of the layers they feed dropped wherever the dataflow
allows it (``graph.regions``; channels that feed a residual add stay, with zero weights). Every other quantizer
becomes a ``TensorQuant`` replaying its eval behaviour. A pruned channel still emits a constant (its folded bias
through the activation and output quantizer, and through any depthwise conv in between); its contribution is
carried into the next layer: into the bias where it is the same at every position, else as a per-position bias
map (zero padding makes border positions see less of it), so the result equals the masked model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import bn_fold, checkpoint_io, fold_bank, gate_bank
from ..errors import CheckpointError, UsageError
from ..graph.modules import set_module
from ..layers import QuantLayer
from .graph import QUANTIZERS, Region, regions
from .layer import ExportLayer, plain_op
from .loader import Loaded, read_export
from .quant import QuantSpec, TensorQuant, spec_entry, spec_from_entry, spec_of

FORMAT = "bayesian-bits-pruned"
MISFIT = "load it into the model it was exported from"
VERSION = 2  # 2: the model's other tensors (norms, embeddings, tokens) travel in the file


@dataclass
class LayerSpec:
    """One exported layer: its pruned float weight and bias, optional bias map, and its quantizers."""

    name: str
    weight: Tensor
    bias: Tensor
    bias_map: Tensor | None
    weight_quant: QuantSpec | None
    act_quant: QuantSpec | None
    kept: Tensor  # indices of kept output channels in the original layer


@dataclass
class ExportPlan:
    """Everything the deployed model needs: its layers, the specs of the quantizers outside layers, and every other
    parameter and buffer of the model (norms, embeddings, position and class tokens: float, as trained)."""

    layers: list[LayerSpec]
    quantizers: dict[str, QuantSpec] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def eval_weight(layer: QuantLayer) -> tuple[Tensor, Tensor]:
    """The layer's eval weight (BN-folded, fake-quantized, pruned rows zero) and bias (folded BN bias or own)."""
    bn, quantize = layer.bn, layer.weight_quantizer
    weight = layer.weight if bn is None else bn_fold.fold_weight(layer.weight, bn)
    if quantize is not None:
        weight = quantize(weight)
    if bn is not None:
        bias = bn_fold.folded_bias(bn)
    else:
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
    return weight.detach().clone(), bias.detach().clone()


@torch.no_grad()
def layer_inputs(loaded: Loaded, names: list[str]) -> dict[str, Tensor]:
    """Each named layer's input for one batch-1 forward of the eval model on ``Loaded.example``."""
    seen: dict[str, Tensor] = {}
    model = loaded.model
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
    try:
        model(loaded.example(1))  # any input: see _carry
    finally:
        for h in hooks:
            h.remove()
    return seen


def _carry(layer: QuantLayer, x: Tensor, weight: Tensor, bias: Tensor, feeding: Region
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Drop the input channels ``feeding`` removes from a dense layer fed by ``x`` (batch 1): returns the narrowed
    weight and the bias, or a zero bias and a bias map, that add what the removed channels contribute."""
    channels, kept_in = feeding.channels, feeding.kept
    per_position = isinstance(layer, nn.Linear) and x.dim() > 2  # a sequence: features in the last dimension
    if per_position:
        removed = x.clone()
        removed[..., kept_in] = 0
    else:
        removed = x.reshape(1, channels, -1).clone()
        removed[:, kept_in] = 0  # what remains: the input-independent values of removed channels
    constant = layer.op(removed.reshape(x.shape), weight, None)[0]
    flat = constant.reshape(-1, constant.shape[-1]).T if per_position else constant.reshape(constant.shape[0], -1)
    per_channel = weight.reshape(weight.shape[0], channels, -1)[:, kept_in]
    weight = per_channel.reshape(weight.shape[0], -1, *weight.shape[2:])
    if bool((flat == flat[:, :1]).all()):
        return weight, bias + flat[:, 0], None
    bias_shape = (-1,) if per_position else (-1, *(1,) * (constant.dim() - 1))
    return weight, torch.zeros_like(bias), constant + bias.reshape(bias_shape)


@torch.no_grad()
def export_plan(loaded: Loaded, multiple: int = 1) -> ExportPlan:
    """The pruned layers of an eval model, with the constants of removed channels carried forward; ``multiple``:
    see ``graph.regions``."""
    model = loaded.model
    found = regions(model, multiple)
    inputs = layer_inputs(loaded, list(found.by_input))
    plan = ExportPlan([])
    for name in found.order:
        layer = model.get_submodule(name)
        weight, bias = eval_weight(layer)
        bias_map = None
        feeding = found.by_input.get(name)
        if feeding is not None and name in feeding.sinks:
            weight, bias, bias_map = _carry(layer, inputs[name], weight, bias, feeding)
        kept = found.by_output[name].kept if name in found.by_output else torch.arange(weight.shape[0])
        if kept.numel() == 0:
            raise UsageError(f"layer {name} has every output channel pruned; the network's output is constant")
        plan.layers.append(LayerSpec(name, weight[kept].contiguous(), bias[kept].contiguous(),
                                     None if bias_map is None else bias_map[kept].contiguous(),
                                     None if layer.weight_quantizer is None else spec_of(layer.weight_quantizer),
                                     None if layer.act_quantizer is None else spec_of(layer.act_quantizer), kept))
    in_layers = tuple(f"{spec.name}." for spec in plan.layers)
    plan.quantizers = {n: spec_of(m) for n, m in model.named_modules()
                       if isinstance(m, QUANTIZERS) and not n.startswith(in_layers)}
    replaced = (*in_layers, *(f"{n}." for n in plan.quantizers), f"{gate_bank.ATTRIBUTE}.", f"{fold_bank.ATTRIBUTE}.")
    plan.state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(replaced)}
    return plan


def assemble(skeleton: nn.Module, plan: ExportPlan) -> nn.Module:
    """A copy of ``skeleton`` (the quantized model, for its structure) with every layer replaced by its
    ``ExportLayer`` and every other quantizer by its ``TensorQuant``; eval mode, no gradients."""
    model = copy.deepcopy(skeleton)
    gate_bank.remove(model)  # the export's quantizers have fixed gates
    modules = dict(model.named_modules())
    missing = [n for n in [*(spec.name for spec in plan.layers), *plan.quantizers]
               if not isinstance(modules.get(n), (QuantLayer, *QUANTIZERS))]
    if missing:
        raise CheckpointError(f"the export names layers or quantizers the model does not have "
                              f"({', '.join(missing[:3])}): {MISFIT}")
    for spec in plan.layers:
        layer = model.get_submodule(spec.name)
        set_module(model, spec.name, ExportLayer(plain_op(layer, spec.weight, spec.bias), spec.bias_map,
                                               layer.activation, spec.act_quant, spec.weight_quant))
    for name, spec in plan.quantizers.items():
        set_module(model, name, TensorQuant(spec))
    try:
        unexpected = model.load_state_dict(plan.state, strict=False).unexpected_keys
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"the export's tensors do not fit the model ({str(exc).splitlines()[-1].strip()}): "
                              f"{MISFIT}") from None
    if unexpected:
        raise CheckpointError(f"the export holds tensors the model does not have ({', '.join(unexpected[:3])}): "
                              f"{MISFIT}")
    return model.eval().requires_grad_(False)


def pruned_model(loaded: Loaded, multiple: int = 1) -> nn.Module:
    """The pruned float model of an eval model (``multiple``: see ``graph.regions``)."""
    return assemble(loaded.model, export_plan(loaded, multiple))


def export_pruned(loaded: Loaded, out: str | Path) -> str:
    """Write the pruned model's plan (tensors and plain data, with a digest); ``load_pruned`` rebuilds it."""
    plan = export_plan(loaded)
    model = assemble(loaded.model, plan)
    layers = [{"name": s.name, "weight": s.weight, "bias": s.bias, "bias_map": s.bias_map,
               "weight_quant": spec_entry(s.weight_quant), "act_quant": spec_entry(s.act_quant), "kept": s.kept}
              for s in plan.layers]
    checkpoint_io.save({"format": FORMAT, "version": VERSION, "model": loaded.name, "options": loaded.options,
                        "input_shape": list(loaded.input_shape), "layers": layers,
                        "quantizers": {name: spec_entry(spec) for name, spec in plan.quantizers.items()},
                        "state": plan.state}, out)
    return f"wrote {out}: pruned float model, {layer_parameters(model):,} parameters " \
           f"(unpruned eval model {layer_parameters(loaded.model):,})"


def load_pruned(path: str | Path, skeleton: nn.Module | None = None, trust_model_code: bool = False) -> nn.Module:
    """The pruned eval model of a file ``export_pruned`` wrote (see ``loader.read_export`` for ``skeleton``,
    ``trust_model_code`` and errors)."""
    data, skeleton = read_export(path, "pruned", FORMAT, VERSION, skeleton, trust_model_code)
    plan = ExportPlan([LayerSpec(e["name"], e["weight"], e["bias"], e["bias_map"], spec_from_entry(e["weight_quant"]),
                                 spec_from_entry(e["act_quant"]), e["kept"]) for e in data["layers"]],
                      {name: spec_from_entry(spec) for name, spec in data["quantizers"].items()}, data["state"])
    return assemble(skeleton, plan)


def layer_parameters(model: nn.Module) -> int:
    """Weights and biases of the conv/linear layers as deployed (folded BN counts as a bias; quantizer and
    gate parameters are not counted)."""
    layers = [m.op if isinstance(m, ExportLayer) else m for m in model.modules()
              if isinstance(m, (ExportLayer, QuantLayer))]
    return sum(m.weight.numel() + m.weight.shape[0] for m in layers)

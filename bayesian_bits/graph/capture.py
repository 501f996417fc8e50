"""Capture: a float model as an fx graph of ATen ops, by `torch.export` (non-strict, the training IR), with the
user's module names.

The graph is exported in training mode with a dynamic batch dimension (and a dynamic sequence length for integer
token inputs). What must behave differently in eval becomes a module again, run by `call_module`:

- every `batch_norm` over a BatchNorm module's running statistics is that BatchNorm (a subclass such as timm's
  `BatchNormAct2d` becomes a plain BatchNorm holding the same tensors; its activation stays an op of its own);
- every dropout becomes a dropout module (the model's own where it called one, else `nn.Dropout`, `Dropout1d/2d/3d`
  or the alpha dropouts by op and rank), a dropout of p = 0 goes;
- any other module whose ops differ between a training-mode and an eval-mode export (stochastic depth, drop path,
  ``if self.training:`` code) is kept whole, provided it has one tensor input and output and no MAC op.

torch.export's own guards and assertions are dropped, constants become buffers and a device the export baked in is
read from the input at run time, so the prepared model moves between devices and batch sizes. In-place ops whose
written input nothing else reads become out-of-place. Each op node keeps its ``nn_module_stack``; `tensor_meta`
holds shapes for the batch-1 example.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from . import aten as ops
from .attention import split_attention
from .modules import call_key, drop_unread_attributes, free_path, has, module_path, node_meta, scope, set_module

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DROPOUTS = {ops.aten.dropout.default: nn.Dropout, ops.aten.alpha_dropout.default: nn.AlphaDropout,
            ops.aten.feature_alpha_dropout.default: nn.FeatureAlphaDropout}
FEATURE_DROPOUTS = {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}  # aten.feature_dropout by input rank

NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"


class CaptureError(ValueError):
    """torch.export cannot capture the model; the message names the module it was running."""


def capture(model: nn.Module, inputs: tuple[Tensor, ...]) -> fx.GraphModule:
    """``model`` (a copy the caller owns: its modules are reused) as an fx graph of ATen ops and mode-dependent
    modules; ``inputs`` are batch-1 examples on the model's device."""
    _runs(model, inputs)
    example = tuple(torch.cat([x, x]) for x in inputs)  # batch 2: export specialises sizes 0 and 1
    train = _export(model.train(), example)
    evaluated = _export(model.eval(), example)
    gm = train.module()
    graph = gm.graph
    eval_graph = evaluated.module().graph
    for g in (graph, eval_graph):
        _clean_stacks(g)
    whole = _mode_dependent(graph, eval_graph)
    _drop_guards(gm)
    _constants_as_buffers(gm)
    _untie(gm, model)
    _runtime_device(graph, example[0].device)
    _batch_norms(gm, model)
    _dropouts(gm, model)
    _keep_whole(gm, model, whole)
    split_attention(gm, lambda node: scope(module_path(node), model))
    _functionalize(graph)
    graph.eliminate_dead_code()
    out = fx.GraphModule(gm, graph, type(model).__name__)
    _follow_order(out, model)
    _shapes(out, inputs)
    return out


def _runs(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """The model runs eagerly on the example (this also sizes lazy modules); its own error, not the exporter's."""
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as err:
        raise CaptureError(f"the example inputs do not run through {type(model).__name__}: {type(err).__name__}: "
                           f"{err}") from err


def dynamic_dims(x: Tensor) -> dict[int, Any]:
    """Batch dynamic; for integer token inputs the sequence length too, where the model allows it."""
    dims: dict[int, Any] = {0: Dim.DYNAMIC}
    if not x.is_floating_point() and x.dim() >= 2:
        dims[1] = Dim.AUTO
    return dims


def _export(model: nn.Module, example: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    stack: list[str] = []
    with _module_stack(model, stack):
        try:
            return torch.export.export(model, example, dynamic_shapes=tuple(dynamic_dims(x) for x in example),
                                       strict=False)
        except Exception as err:
            mode = "training" if model.training else "eval"
            where = f"in module {stack[-1]} ({type(model.get_submodule(stack[-1])).__name__})" if stack and stack[-1] \
                else f"in {type(model).__name__}.forward"
            message = " ".join(str(err).split("\n\n")[0].split())[:400]
            raise CaptureError(
                f"torch.export cannot capture {type(model).__name__} ({mode} mode) {where}: {type(err).__name__}: "
                f"{message}. Make that code traceable by torch.export (no Python branches on tensor values; a fixed "
                "batch size becomes x.shape[0]), or leave the model out") from err


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list[str]) -> Iterator[None]:
    """Keep ``stack`` at the names of the modules whose forward is running (the innermost last)."""
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda *_, name=name: stack.append(name)))
        handles.append(m.register_forward_hook(lambda *_: _pop(stack)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pop(stack: list[str]) -> None:
    stack.pop()


def _clean_stacks(graph: fx.Graph) -> None:
    """Drop the placeholder entry torch.export puts in the module stack of nodes no module ran."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack and NO_MODULE in stack:
            node.meta["nn_module_stack"] = {k: v for k, v in stack.items() if k != NO_MODULE}


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                (node.op == "call_function" and node.target in ops.ASSERTS):
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _constants_as_buffers(gm: fx.GraphModule) -> None:
    """Tensor constants torch.export lifted out of the code become non-persistent buffers (they move with `.to`)."""
    held = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        parent, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        value = getattr(owner, name)
        if isinstance(value, Tensor) and id(value) not in held:
            delattr(owner, name)
            owner.register_buffer(name, value, persistent=False)
            held.add(id(value))


def _untie(gm: fx.GraphModule, model: nn.Module) -> None:
    """A parameter several modules share (a language model's tied embedding and output layer) is read by each op
    under its own module's name for it: the layer quantizes it, the embedding looks up the float tensor."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        parent, _, attr = node.target.rpartition(".")
        value = getattr(gm.get_submodule(parent), attr)
        for user in list(node.users):
            alias = next((a for a in names.get(id(value), ()) if a.rpartition(".")[0] == module_path(user)), None)
            if alias is None or alias == node.target:
                continue
            owner, _, leaf = alias.rpartition(".")
            if not has(gm, owner):
                set_module(gm, owner, nn.Module())
            if not hasattr(gm.get_submodule(owner), leaf):
                gm.get_submodule(owner).register_parameter(leaf, value)
            with gm.graph.inserting_before(user):
                own = gm.graph.get_attr(alias)
            own.meta.update(node.meta)
            user.replace_input_with(node, own)


def _runtime_device(graph: fx.Graph, device: torch.device) -> None:
    """A ``device=`` the export wrote into an op (``arange``, ``new_ones``, ``to``) is read from the first input at
    run time instead."""
    first = next(n for n in graph.nodes if n.op == "placeholder")
    found: fx.Node | None = None
    for node in list(graph.nodes):
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        for i, a in enumerate(node.target._schema.arguments):
            if a.name != "device":
                continue
            value = node.kwargs.get("device", node.args[i] if i < len(node.args) else None)
            if not isinstance(value, torch.device) or value != device:
                continue
            if found is None:
                with graph.inserting_after(first):
                    found = graph.call_function(getattr, (first, "device"))
            if "device" in node.kwargs:
                node.update_kwarg("device", found)
            else:
                node.update_arg(i, found)


def _owner(model: nn.Module, node: Any) -> tuple[str, nn.Module] | None:
    """(path, module of ``model``) owning the parameter or buffer a get_attr ``node`` reads."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    parent = node.target.rpartition(".")[0]
    return (parent, model.get_submodule(parent)) if has(model, parent) else None


def _replace_by_module(gm: fx.GraphModule, region: list[fx.Node], path: str, module: nn.Module, what: str) -> None:
    """Replace the nodes of ``region`` (one module call: one tensor input, one output) by ``call_module(path)``."""
    inside = set(region)
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes
                                if a not in inside and a.op != "get_attr" and _is_tensor(a)))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise CaptureError(f"module {path} ({type(module).__name__}) {what}, so it must be kept whole, but its call "
                           f"has {len(inputs)} tensor inputs and {len(outputs)} outputs (one each is supported): "
                           "make it a module of one tensor in and one out")
    set_module(gm, path, module)
    with gm.graph.inserting_after(outputs[0]):
        call = gm.graph.call_module(path, (inputs[0],))
    call.meta = node_meta(outputs[0])
    outputs[0].replace_all_uses_with(call, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region):
        gm.graph.erase_node(node)
    drop_unread_attributes(gm.graph)


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), Tensor) or "tensor_meta" in node.meta


def _batch_norms(gm: fx.GraphModule, model: nn.Module) -> None:
    """Each `batch_norm` over a BatchNorm module's running statistics (and the module's increment of its batch
    count) becomes a call of that BatchNorm: training and eval then use batch and running statistics in turn."""
    for node in list(gm.graph.nodes):
        if not ops.is_op(node, {ops.BATCH_NORM}):
            continue
        found = _owner(model, ops.arg(node, "running_mean"))
        if found is None or not isinstance(found[1], _BatchNorm):
            continue
        path, bn = found
        count = f"{path}.num_batches_tracked"
        region = [n for n in gm.graph.nodes if n is node or (_counts_batches(n) and n.args[0].target == count
                                                             and call_key(n) == call_key(node))]
        _replace_by_module(gm, region, path, bn if type(bn) in BATCH_NORMS else _plain_batch_norm(bn),
                           "normalises with batch statistics in training")


def _counts_batches(node: fx.Node) -> bool:
    """Whether ``node`` is a BatchNorm's increment of its ``num_batches_tracked``."""
    return ops.is_op(node, {ops.aten.add.Tensor}) and isinstance(node.args[0], fx.Node) and \
        node.args[0].op == "get_attr" and node.args[0].target.endswith("num_batches_tracked")


def _plain_batch_norm(bn: _BatchNorm) -> _BatchNorm:
    """A torch BatchNorm holding the same parameters and buffers as the BatchNorm subclass ``bn``."""
    cls = next((c for c in type(bn).__mro__ if c in BATCH_NORMS), nn.BatchNorm2d)
    plain = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(plain, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain._buffers[name] = getattr(bn, name)
    return plain


def _dropouts(gm: fx.GraphModule, model: nn.Module) -> None:
    """Each dropout becomes a dropout module (the model's own where it called one); p = 0 is no op at all."""
    for node in list(gm.graph.nodes):
        if not ops.is_op(node, ops.DROPOUT):
            continue
        p, train = float(ops.arg(node, "p")), bool(ops.arg(node, "train"))
        if p == 0.0 or not train:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        path = module_path(node)
        own = model.get_submodule(path) if path else None
        if isinstance(own, _DropoutNd) and own.p == p:
            module = own
        else:
            cls = DROPOUTS.get(ops.base_op(node), FEATURE_DROPOUTS.get(node.args[0].meta["val"].dim(), nn.Dropout))
            module, path = cls(p), free_path(gm, f"{scope(path, model)}dropout")
        _replace_by_module(gm, [node], path, module, "drops values in training")


def _signatures(graph: fx.Graph) -> dict[str, list[tuple]]:
    """Per module call: its own ops with their scalar arguments, leaving out what `capture` turns into modules
    (dropout, batch norm and its batch count), the SDPA dropout probability, copies that only change the memory
    layout (an export records `contiguous` only where the input is not) and shape arithmetic."""
    out: dict[str, list[tuple]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or \
                node.target in ops.ASSERTS | ops.COPIES or ops.is_op(node, ops.DROPOUT | {ops.BATCH_NORM}) or \
                not _is_tensor(node):
            continue
        if _counts_batches(node):
            continue
        scalars = () if node.target in ops.ATTENTION else tuple(
            a for a in node.args if isinstance(a, (bool, int, float, str)))
        out.setdefault(call_key(node) or "", []).append((str(node.target), scalars))
    return out


def _mode_dependent(train: fx.Graph, evaluated: fx.Graph) -> list[str]:
    """The outermost module calls whose own ops differ between the two exports."""
    a, b = _signatures(train), _signatures(evaluated)
    differ = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key) and key}
    chains = {}
    for node in train.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            keys = list(stack)
            for i, key in enumerate(keys):
                chains.setdefault(key, keys[:i])
    return [key for key in differ if key in chains and not any(k in differ for k in chains[key])]


def _keep_whole(gm: fx.GraphModule, model: nn.Module, keys: list[str]) -> None:
    for key in keys:
        region = [n for n in gm.graph.nodes if key in n.meta.get("nn_module_stack", {})]
        if not region:
            continue
        path = region[0].meta["nn_module_stack"][key][0]
        module = model.get_submodule(path)
        what = "computes differently in training and in eval (beyond dropout and batch norm)"
        macs = [n for n in region if ops.is_op(n, ops.MAC_OPS)]
        if macs:
            raise CaptureError(f"module {path} ({type(module).__name__}) {what} and holds MAC-carrying ops "
                               f"({', '.join(sorted({str(n.target) for n in macs}))}): torch.export captures one mode "
                               "only. Move its training-only code into a module of its own without them")
        _replace_by_module(gm, region, path, module, what)


def _follow_order(module: nn.Module, like: nn.Module) -> None:
    """Order the submodules of ``module`` (recursively) as those of ``like`` are: fx.GraphModule copies them in the
    order its graph first names them, and a state_dict should list them as the model does."""
    order = {name: i for i, name in enumerate(like._modules)}
    module._modules = dict(sorted(module._modules.items(), key=lambda kv: order.get(kv[0], len(order))))
    for name, child in module._modules.items():
        if name in like._modules and child is not None and like._modules[name] is not None:
            _follow_order(child, like._modules[name])


def _functionalize(graph: fx.Graph) -> None:
    """An in-place op becomes out-of-place where nothing else reads the tensor it writes (not a view, one user)."""
    for node in graph.nodes:
        twin = ops.out_of_place(node.target) if node.op == "call_function" else None
        if twin is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        written = node.args[0]
        fresh = (written.op == "call_function" and not ops.is_view(written.target) and not ops.is_getitem(written)) \
            or (written.op == "call_module" and isinstance(graph.owning_module.get_submodule(written.target),
                                                           _BatchNorm))
        if fresh and len(written.users) == 1:
            node.target = twin


def _shapes(gm: fx.GraphModule, inputs: tuple[Tensor, ...]) -> None:
    """`tensor_meta` of every node for the batch-1 ``inputs`` (eval mode)."""
    printed = io.StringIO()  # ShapeProp prints the traceback of a failing node before raising its own error
    was = gm.training
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(gm.eval()).propagate(*inputs)
    except Exception as err:
        cause = err.__cause__ or err
        raise CaptureError(f"the captured graph does not run on the batch-1 example: {type(cause).__name__}: "
                           f"{cause}") from err
    finally:
        gm.train(was)
    sys.stderr.write(printed.getvalue())

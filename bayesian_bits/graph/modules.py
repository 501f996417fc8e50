"""Module paths in a captured graph: which module ran a node, where a new module may go, placing one there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn


def module_path(node: fx.Node) -> str:
    """The path of the innermost module whose forward ran ``node`` ('' for the model's own forward)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def call_key(node: fx.Node) -> str | None:
    """The innermost module call that ran ``node`` (distinct for each call of one module)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)) if stack else None


def scope(path: str, model: nn.Module) -> str:
    """The prefix for a module created on behalf of module ``path``: ``path.``, or its parent's for a module of torch
    itself without children (a ReLU, a BatchNorm, a Dropout: as if the op ran in the parent), '' at the top."""
    module = model.get_submodule(path) if path and has(model, path) else None
    if module is not None and type(module).__module__.startswith("torch.nn.") and not list(module.children()):
        path = path.rpartition(".")[0]
    return f"{path}." if path else ""


def has(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule of ``model``."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def numbered(base: str, taken: Callable[[str], bool]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not ``taken``."""
    name, i = base, 1
    while taken(name):
        name, i = f"{base}_{i}", i + 1
    return name


def free_path(model: nn.Module, base: str) -> str:
    """``base`` numbered to the first path that names nothing in ``model``."""
    return numbered(base, lambda path: has(model, path) or _attribute(model, path))


def node_meta(node: fx.Node) -> dict[str, Any]:
    """What a node that stands for ``node`` (a module call, a quantizer after it) carries over: value, shape and
    module stack."""
    return {k: v for k, v in node.meta.items() if k in ("tensor_meta", "val", "nn_module_stack")}


def _attribute(model: nn.Module, path: str) -> bool:
    parent, _, name = path.rpartition(".")
    return has(model, parent) and hasattr(model.get_submodule(parent) if parent else model, name)


def set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` of ``gm`` (creating empty parents), replacing a module there."""
    parent, _, name = path.rpartition(".")
    if parent and not has(gm, parent):
        set_module(gm, parent, nn.Module())
    owner = gm.get_submodule(parent) if parent else gm
    if name not in owner._modules and hasattr(owner, name):
        raise ValueError(f"cannot place a module at {path}: {type(owner).__name__} has an attribute {name!r}")
    owner._modules[name] = module


def drop_unread_attributes(graph: fx.Graph) -> None:
    """Erase the get_attr nodes nothing reads any more (after their op was replaced by a module call)."""
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)

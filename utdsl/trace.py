"""Tracing a backbone into a torch.fx graph, and finding the region of nodes a module produced.

Every module is traced *through* (timm's own non-traceable modules and functions stay leaves), so a
tuner can sit on any module, leaf or container: the region of module ``p`` is the set of nodes whose
``nn_module_stack`` contains ``p``. Its boundary (the values flowing in and out) is where a
placement attaches.

``forward``'s optional arguments (timm's ``attn_mask=None``, ``is_causal=False``) are traced as
their defaults: the compiled model is called with its input alone, as a classifier is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .errors import ModelError

__all__ = ["trace", "trace_graph", "copy_model_attrs", "Region", "region", "module_path_of", "stack_up_to"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover - timm is a dependency, but models need not be timm's
        return (), ()
    modules = tuple(getattr(timm_fx, "_leaf_modules", ()))
    functions = tuple(getattr(timm_fx, "_autowrap_functions", ()))
    return modules, functions


class BackboneTracer(fx.Tracer):
    """fx tracer that traces through every module except torch.nn's own and timm's registered leaves."""

    def __init__(self) -> None:
        self._leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_graph(model: nn.Module) -> fx.Graph:
    """Symbolically trace ``model`` in its current mode into a graph whose targets are ``model``'s
    own qualified names."""
    tracer = BackboneTracer()
    try:
        return tracer.trace(model, concrete_args=_optional_defaults(model) or None)
    except Exception as error:  # fx raises TraceError, TypeError, RuntimeError... from user code
        raise ModelError(
            f"{type(model).__name__} cannot be traced by torch.fx: {type(error).__name__}: {error}",
            hint="control flow on tensor values is not traceable; register such a function with "
                 "timm.layers.register_notrace_function or the module with register_notrace_module",
        ) from error


def _optional_defaults(model: nn.Module) -> dict[str, object]:
    """``forward``'s optional arguments after the input with their plain defaults (None, bool,
    number, string). fx cannot branch on a placeholder (timm's ViT loops over its blocks one by one
    when ``attn_mask is not None``), so these are traced as their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}
    plain = (type(None), bool, int, float, str)
    return {p.name: p.default for p in params
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and isinstance(p.default, plain)}


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; base parameters keep their names in the result."""
    gm = fx.GraphModule(model, trace_graph(model), type(model).__name__)
    copy_model_attrs(model, gm)
    return gm


def copy_model_attrs(model: nn.Module, gm: fx.GraphModule) -> None:
    """Carry the plain attributes that later stages read (timm's configs, prefix-token count)."""
    for attr in ("pretrained_cfg", "default_cfg", "num_classes", "num_prefix_tokens"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))


def module_path_of(node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values()]


@dataclass
class Region:
    """The nodes a module's call produced, with the values that enter and leave them."""

    path: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]     # nodes outside the region used inside it (get_attr excluded)
    outputs: list[fx.Node]    # nodes inside the region used outside it

    @property
    def tensor_inputs(self) -> list[fx.Node]:
        return [n for n in self.inputs if _is_tensor(n)]

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def region(graph: fx.Graph, path: str) -> Region | None:
    """The region of module ``path`` in ``graph``, or None if the module is never called."""
    nodes = [n for n in graph.nodes if path in module_path_of(n)]
    if not nodes:
        return None
    inside = set(nodes)
    inputs: dict[fx.Node, None] = {}
    outputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                inputs[arg] = None
        if any(user not in inside for user in node.users):
            outputs[node] = None
    return Region(path, nodes, list(inputs), list(outputs))


def stack_up_to(node: fx.Node, path: str) -> dict:
    """``node``'s module stack truncated after ``path``: the stack of a node added *at* ``path``."""
    stack = {}
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        stack[key] = value
        if value[0] == path:
            break
    return stack

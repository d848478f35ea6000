"""Tracing a backbone into a torch.fx graph, and finding the region of nodes a module produced.

Every module is traced *through* (timm's own non-traceable modules and functions stay leaves), so a
tuner can sit on any module, leaf or container: the region of module ``p`` is the set of nodes whose
``nn_module_stack`` contains ``p``. Its boundary (the values flowing in and out) is where a
placement attaches.

A module that is never called but whose weight is used functionally (timm's EVA-02, BEiT and
SwinV2 attention run ``F.linear(x, self.qkv.weight, qkv_bias)`` with a bias built from
``q_bias``/``v_bias``) has the region of that call: its input is the call's data input, its output
the call's result; the weight and the bias are part of the operation.

``forward``'s optional arguments (timm's ``attn_mask=None``, ``is_causal=False``) are traced as
their defaults: the compiled model is called with its input alone, as a classifier is.
"""

from __future__ import annotations

import bisect
import contextlib
import dis
import functools
import inspect
import operator
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

__all__ = ["indexed_regions", "RegionIndex", "leaf_enclosing", "trace", "trace_graph", "copy_model_attrs", "Region", "region", "module_path_of", "stack_up_to",
           "FunctionalUse", "weight_calls"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover - timm is a dependency, but models need not be timm's
        return (), ()
    modules = tuple(getattr(timm_fx, "_leaf_modules", ()))
    functions = tuple(getattr(timm_fx, "_autowrap_functions", ()))
    return modules, functions


class _Unpacking:
    """fx's Proxy, unpacking (``B, N, C = x.shape``, ``q, k, v = qkv.unbind(0)``) as fx does,
    from the caller's bytecode, but disassembling each calling function once: fx does it at every
    unpacking, a third of the time a ViT's trace takes."""

    def __getattr__(self, k: str) -> "_Attribute":
        return _Attribute(self, k)

    def __iter__(self):
        frame = inspect.currentframe().f_back
        instructions = _instructions(frame.f_code)
        if sys.version_info >= (3, 11):
            index = bisect.bisect_left(instructions, frame.f_lasti, key=lambda i: i.offset)
        else:  # pragma: no cover - older Pythons
            index = frame.f_lasti // 2
        if index < len(instructions) and instructions[index].opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(instructions[index].argval))
        return self.tracer.iter(self)


class _Proxy(_Unpacking, fx.Proxy):
    pass


class _Attribute(_Unpacking, fx.proxy.Attribute):
    pass


@functools.lru_cache(maxsize=512)
def _instructions(code) -> list:
    return list(dis.get_instructions(code))


class BackboneTracer(fx.Tracer):
    """fx tracer that traces through every module except torch.nn's own and timm's registered leaves."""

    def __init__(self) -> None:
        self._leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self._through: set[int] = set()   # modules traced through a replacement forward
        self._names: tuple[dict[int, str], dict[int, str]] | None = None
        #: the module calls being traced, innermost last: (module, args, kwargs)
        self.calls: list[tuple[nn.Module, tuple, dict]] = []

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._names = None
        try:
            return super().trace(root, concrete_args)
        finally:
            self._names = None

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's lookup of a parameter or buffer read inside a forward, by a name index built once a
        trace (fx searches ``named_parameters()`` on every read: quadratic in the model's size).
        The first name of a tensor wins, as in fx's search."""
        if not isinstance(attr_val, torch.Tensor) or not isinstance(self.root, nn.Module):
            return attr_val
        if self._names is None:
            params: dict[int, str] = {}
            for name, p in self.root.named_parameters():
                params.setdefault(id(p), name)
            buffers: dict[int, str] = {}
            for name, b in self.root.named_buffers():
                buffers.setdefault(id(b), name)
            self._names = (params, buffers)
        params, buffers = self._names
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            factory = (None if not self.param_shapes_constant
                       else lambda node: fx.proxy.ParameterProxy(self, node, name, attr_val))
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._through:
            return False
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict):
        """Trace ``m`` through the traceable forward :mod:`utdsl.backends` gives for it, if any
        (``nn.MultiheadAttention``)."""
        from .backends import traceable_forward

        replacement = traceable_forward(m, args, kwargs)
        self.calls.append((m, args, kwargs))
        if replacement is None:
            try:
                return super().call_module(m, forward, args, kwargs)
            finally:
                self.calls.pop()
        self._through.add(id(m))
        try:
            return super().call_module(m, replacement, args, kwargs)
        finally:
            self._through.discard(id(m))
            self.calls.pop()


def trace_graph(model: nn.Module, example_input=None, route: str = "auto",
                tracer: BackboneTracer | None = None) -> fx.Graph:
    """Trace ``model`` in its current mode into a graph whose targets are ``model``'s own qualified
    names. ``route``: ``"fx"`` traces symbolically; ``"export"`` runs ``torch.export`` on
    ``example_input`` (every size but the batch then fixed); ``"auto"`` exports the models
    :func:`utdsl.backends.uses_export` names (Hugging Face transformers) and the models torch.fx
    cannot trace (control flow on tensor values), and traces the rest symbolically (with
    ``tracer``, when given: ``tracer.root`` is ``model`` afterwards only on that route)."""
    from . import backends

    if route == "export" or (route == "auto" and backends.uses_export(model)):
        return backends.export_graph(model, example_input)
    tracer = tracer or BackboneTracer()
    try:
        return tracer.trace(model, concrete_args=_optional_defaults(model) or None)
    except Exception as error:  # fx raises TraceError, TypeError, RuntimeError... from user code
        fx_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if route == "auto" and example_input is not None:
            try:
                return backends.export_graph(model, example_input)
            except ModelError as export_error:
                fx_error += f"; torch.export: {export_error.diagnostics[0].message}"
        raise ModelError(
            f"{type(model).__name__} cannot be traced by torch.fx: {fx_error}",
            hint="control flow on tensor values is not traceable; register such a function with "
                 "timm.layers.register_notrace_function or the module with register_notrace_module",
        ) from error


def leaf_enclosing(graph: fx.Graph, path: str) -> str | None:
    """The innermost module enclosing ``path`` that ``graph`` calls as one opaque leaf, if any: a
    site inside it has no nodes of its own."""
    index = _ACTIVE.get(id(graph))
    called = index.called() if index is not None else {n.target for n in graph.nodes if n.op == "call_module"}
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in called:
            return prefix
    return None


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
    calls: int = 0            # functional uses of the module's weight (0: the module is called)

    @property
    def tensor_inputs(self) -> list[fx.Node]:
        return [n for n in self.inputs if _is_tensor(n)]

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


class FunctionalUse:
    """The module type recorded in a node's stack for a site whose module is used functionally:
    nodes inserted there carry the site's path without the module having been called."""


def region(graph: fx.Graph, path: str) -> Region | None:
    """The region of module ``path`` in ``graph``, or None if the module is neither called nor its
    weight used by a linear or convolution call. A module called by the forward has the region of
    its calls (``calls == 0``); otherwise the region holds the functional calls of its weight
    (:func:`weight_calls`) and the nodes inserted at the site since. Inside
    :func:`indexed_regions` the lookup reads the graph's index instead of scanning the graph.
    A span site path (``blocks.3(norm2..drop_path2)``) has the region of :func:`utdsl.spans.span_region`."""
    if path.endswith(")"):
        from .spans import span_region

        return span_region(graph, path)
    index = _ACTIVE.get(id(graph))
    tagged = index.tagged(path) if index is not None else [n for n in graph.nodes if path in module_path_of(n)]
    if any(not _functional_entry(n, path) for n in tagged):
        return _bounded(path, tagged, {}, calls=0)
    data = weight_calls(graph, path)
    if not data:
        return None
    inside = set(data) | set(tagged)
    return _bounded(path, [n for n in graph.nodes if n in inside], data, calls=len(data))


def _bounded(path: str, nodes: list[fx.Node], data: dict[fx.Node, fx.Node], calls: int) -> Region:
    """``nodes`` with their boundary; a node in ``data`` takes only its data input from outside."""
    inside = set(nodes)
    inputs: dict[fx.Node, None] = {}
    outputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in ([data[node]] if node in data else node.all_input_nodes):
            if arg not in inside and arg.op != "get_attr":
                inputs[arg] = None
        if any(user not in inside for user in node.users):
            outputs[node] = None
    return Region(path, nodes, list(inputs), list(outputs), calls)


def _functional_entry(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(value[0] == path and value[1] is FunctionalUse for value in stack.values())


#: function -> (argument names, data argument, weight argument, weight is transposed)
_WEIGHT_OPS: dict = {
    F.linear: (("input", "weight", "bias"), "input", "weight", False),
    **{conv: (("input", "weight", "bias"), "input", "weight", False) for conv in (F.conv1d, F.conv2d, F.conv3d)},
    torch.addmm: (("input", "mat1", "mat2"), "mat1", "mat2", True),
    torch.matmul: (("input", "other"), "input", "other", True),
    operator.matmul: (("input", "other"), "input", "other", True),
}


def weight_calls(graph: fx.Graph, path: str) -> dict[fx.Node, fx.Node]:
    """Calls (``F.linear``, ``F.conv*d``, ``torch.addmm`` or ``x @ w.t()``) that use a parameter
    of module ``path`` as their weight, each with its data input, in graph order."""
    prefix = path + "."
    weights = {n for n in graph.nodes if n.op == "get_attr" and isinstance(n.target, str)
               and n.target.startswith(prefix) and "." not in n.target[len(prefix):]}
    found: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        op = _WEIGHT_OPS.get(node.target) if node.op == "call_function" else None
        if op is None:
            continue
        names, data_name, weight_name, transposed = op
        values = dict(zip(names, node.args)) | dict(node.kwargs)
        weight, data = values.get(weight_name), values.get(data_name)
        if transposed and isinstance(weight, fx.Node) and _is_transpose(weight):
            weight = weight.args[0]
        if weight in weights and isinstance(data, fx.Node):
            found[node] = data
    return found


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_function" and node.target is torch.t:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",))


def stack_up_to(node: fx.Node, path: str) -> dict:
    """``node``'s module stack truncated after ``path``: the stack of a node added *at* ``path``.
    When ``path`` is not on it (a module used functionally), ``path`` is appended with the type
    :class:`FunctionalUse`, so that :func:`region` finds the added node at the site. A span site
    (``blocks.3(norm2..drop_path2)``) truncates after its parent module and appends the span."""
    if path.endswith(")"):
        from .spans import parse_site

        stack = stack_up_to(node, parse_site(path).parent)
        stack[path] = (path, FunctionalUse)
        return stack
    stack = {}
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        stack[key] = value
        if value[0] == path:
            return stack
    stack[path] = (path, FunctionalUse)
    return stack


class RegionIndex:
    """The nodes of one graph by the module paths on their stacks, kept up to date as nodes are
    added or erased (through the GraphModule's node hooks), so that looking a region up costs the
    region's size, not the graph's: a compile stays linear in its insertions.

    A new node's stack is read at the first lookup after its creation (placements set it right
    after creating the node)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self._by_path: dict[str, list[fx.Node]] = {}
        self._unsorted: set[str] = set()
        self._pending: dict[fx.Node, None] = {}
        self._calls: dict[str, int] = {}    # call_module target -> number of calls
        for node in graph.nodes:
            self._add(node)
        self._unsorted.clear()

    def _add(self, node: fx.Node) -> None:
        for path in dict.fromkeys(module_path_of(node)):
            self._by_path.setdefault(path, []).append(node)
            self._unsorted.add(path)
        if node.op == "call_module":
            self._calls[node.target] = self._calls.get(node.target, 0) + 1

    def created(self, node: fx.Node) -> None:
        if node.graph is self.graph:
            self._pending[node] = None

    def erased(self, node: fx.Node) -> None:
        if node.graph is not self.graph:
            return
        if node in self._pending:
            del self._pending[node]
            return
        for path in dict.fromkeys(module_path_of(node)):
            nodes = self._by_path.get(path, [])
            if node in nodes:
                nodes.remove(node)
        if node.op == "call_module" and self._calls.get(node.target):
            self._calls[node.target] -= 1

    def _settle(self) -> None:
        pending, self._pending = self._pending, {}
        for node in pending:
            self._add(node)

    def tagged(self, path: str) -> list[fx.Node]:
        """The nodes whose module stack holds ``path``, in graph order."""
        self._settle()
        nodes = self._by_path.get(path, [])
        if path in self._unsorted:
            nodes.sort()          # fx nodes compare by their position in the graph
            self._unsorted.discard(path)
        return list(nodes)

    def called(self) -> set:
        """The targets of the graph's ``call_module`` nodes."""
        self._settle()
        return {target for target, count in self._calls.items() if count}


_ACTIVE: dict[int, RegionIndex] = {}


@contextlib.contextmanager
def indexed_regions(gm: fx.GraphModule) -> Iterator[RegionIndex | None]:
    """Within the block, :func:`region` and :func:`leaf_enclosing` on ``gm.graph`` (the graph
    active on entry) read a :class:`RegionIndex` that follows the graph's edits (yielded; None
    where this torch has no node hooks, and lookups scan the graph as outside the block)."""
    graph = gm.graph
    if id(graph) in _ACTIVE:        # nested: the outer index already follows this graph
        yield _ACTIVE[id(graph)]
        return
    if getattr(gm, "_register_create_node_hook", None) is None:
        yield None
        return
    index = RegionIndex(graph)
    gm._register_create_node_hook(index.created)
    gm._register_erase_node_hook(index.erased)
    _ACTIVE[id(graph)] = index
    try:
        yield index
    finally:
        del _ACTIVE[id(graph)]
        gm._unregister_create_node_hook(index.created)
        gm._unregister_erase_node_hook(index.erased)

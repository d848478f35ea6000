"""A GraphModule with one graph per training mode.

torch.fx bakes ``self.training`` branches in at trace time: timm's DropPath traces to a Bernoulli
mask in train mode and to nothing in eval mode, ``scaled_dot_product_attention`` gets a constant
``dropout_p``. A single traced graph therefore has one mode's behaviour forever. ``trace_modes``
traces the model in both modes, and :class:`ModalGraphModule` keeps both graphs and runs the one
of its current mode: ``.train()``/``.eval()`` switch it (a switch regenerates ``forward``; it costs
about 10 ms on ViT-B/16, and nothing when the mode does not change).

Invariants: both graphs call the same module instances (base modules and tuners), so parameters,
``state_dict`` keys and ``gm.meta`` are those of one model; when the two traces are identical
there is a single graph and no switch ever happens. ``gm.graph`` is the active mode's graph; a
pass that edits graphs edits each one in turn through :meth:`ModalGraphModule.each_graph`
(``compile`` and ``merge`` do). Deep copies keep both graphs, and so does pickling
(``torch.save`` of the whole model): as fx does, each distinct graph is stored as its generated
code and traced again on load, every module a leaf (:func:`_restore`).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterator, Mapping

import torch.fx as fx
from torch import nn
from torch.fx.graph import _is_from_torch
from torch.fx.graph_module import _CodeOnlyModule, _copy_attr, _format_import_block, _forward_from_src
from torch.package import sys_importer

from .backends import finish_module, has_attr_path
from .same_modes import TrainingReads, same_graph, same_in_both_modes
from .trace import BackboneTracer, copy_model_attrs, trace_graph

__all__ = ["ModalGraphModule", "same_graph", "trace_modes"]


class ModalGraphModule(fx.GraphModule):
    """A GraphModule holding a train graph and an eval graph; ``train(mode)`` selects one."""

    def __init__(self, root: nn.Module, graphs: Mapping[bool, fx.Graph], class_name: str = "GraphModule",
                 *, codegen: bool = True):
        graphs = {True: graphs[True], False: graphs[False]}
        active = graphs[bool(getattr(root, "training", True))]
        if not codegen:     # the caller edits the graph and recompiles: generating code now is wasted
            self.__dict__["_codegen_deferred"] = True
        super().__init__(root, active, class_name)
        for graph in graphs.values():
            if graph is not active:
                _copy_targets(root, self, graph)
            graph.owning_module = self
        self._mode_graphs = graphs

    def recompile(self):
        if self.__dict__.get("_codegen_deferred"):
            return None
        code = super().recompile()
        # keep each graph's forward: switching back to it restores that very function, so a mode
        # switch costs nothing and torch.compile's cache (keyed by the code object) still holds
        state = {name: self.__dict__[name] for name in _GENERATED if name in self.__dict__}
        self.__dict__.setdefault("_generated", {})[id(self._graph)] = (self._graph, type(self).forward, state)
        return code

    def generate_code(self) -> None:
        """End a deferral of code generation (``trace_modes(codegen=False)``): generate the active
        graph's ``forward`` now; from here on every edit and switch of graph generates it again."""
        if self.__dict__.pop("_codegen_deferred", False):
            self.recompile()

    @property
    def has_mode_graphs(self) -> bool:
        """Whether train and eval mode run different graphs."""
        return self._mode_graphs[True] is not self._mode_graphs[False]

    def graph_for(self, mode: bool) -> fx.Graph:
        return self._mode_graphs[bool(mode)]

    def train(self, mode: bool = True) -> "ModalGraphModule":
        super().train(mode)
        self.select_graph(mode)
        return self

    def select_graph(self, mode: bool) -> None:
        """Make ``mode``'s graph the active one (``self.graph``) without touching ``training``:
        the forward generated for it before, else a new one (``recompile``)."""
        graph = self._mode_graphs[bool(mode)]
        if graph is self.graph:
            return
        kept = self.__dict__.get("_generated", {}).get(id(graph))
        if kept is None or kept[0] is not graph or self.__dict__.get("_codegen_deferred"):
            self.graph = graph          # the setter regenerates forward
            return
        self._graph = graph
        graph.owning_module = self
        _, forward, state = kept
        type(self).forward = forward
        self.__dict__.update(state)

    def each_graph(self) -> Iterator[fx.Graph]:
        """Make each distinct graph active in turn (the eval graph last) and yield it; the graph of
        the current mode is active again afterwards."""
        mode = self.training
        try:
            for graph_mode in ((True, False) if self.has_mode_graphs else (mode,)):
                self.select_graph(graph_mode)
                yield self.graph
        finally:
            self.select_graph(mode)

    def __reduce__(self) -> tuple[Any, ...]:
        # fx pickles the module's __dict__ without its graph plus the graph's code; here the
        # graphs of both modes go as code (fx.Graph objects, with their node metadata, are no
        # pickle format), and the functions the graphs call stay calls on reload.
        body = self.__dict__.copy()
        del body["_graph"], body["_mode_graphs"]
        body.pop("_generated", None)        # generated functions: made again on load
        graphs = [self._mode_graphs[True]] + ([self._mode_graphs[False]] if self.has_mode_graphs else [])
        codes = []
        for graph in graphs:
            code = graph.python_code(root_module="self")
            codes.append(_format_import_block(code.globals, sys_importer) + code.src)
        leaves = {node.target for graph in graphs for node in graph.nodes
                  if node.op == "call_function" and isinstance(node.target, types.FunctionType)
                  and "<locals>" not in node.target.__qualname__ and not _is_from_torch(node.target)}
        return (_restore, (body, codes, tuple(leaves), type(self).__name__))

    def _deepcopy_init(self) -> Callable[..., None]:
        def init(copy: "ModalGraphModule", root: nn.Module, graph: fx.Graph) -> None:
            graphs: dict[bool, fx.Graph] = root.__dict__.get("_mode_graphs") or {True: graph, False: graph}
            ModalGraphModule.__init__(copy, root, graphs, type(self).__name__)

        return init


#: what GraphModule.recompile sets on the module besides ``forward``
_GENERATED = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")


def _copy_targets(root: nn.Module, to: nn.Module, graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and not has_attr_path(to, node.target):
            _copy_attr(root, to, node.target)


class _LeafTracer(fx.Tracer):
    """Traces generated code back into a graph: every module stays a call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _restore(body: dict[str, Any], codes: list[str], leaves: tuple[Callable[..., Any], ...],
             class_name: str) -> "ModalGraphModule":
    """Unpickle a :class:`ModalGraphModule`: trace each stored code (train graph first) against the
    pickled modules, then rebuild the module around the graphs and restore the rest of its
    ``__dict__`` (``meta`` included, which ``GraphModule.__init__`` would reset)."""
    graphs = []
    for src in codes:
        root = type("_CodeOnly", (_CodeOnlyModule,), {"forward": _forward_from_src(src, {})})(body)
        graph = _LeafTracer(autowrap_functions=leaves).trace(root)
        for node in graph.nodes:
            # fx marks calls of its own wrapped functions (``_assert_is_none``, from the concrete
            # ``attn_mask=None``) and their code would then register the dotted name
            # ``torch.fx._symbolic_trace._assert_is_none`` with fx.wrap, which breaks every later
            # trace in the process with a KeyError
            if node.meta.get("is_wrapped") and _is_from_torch(node.target):
                del node.meta["is_wrapped"]
        graph._tracer_cls = body.get("_tracer_cls")
        graphs.append(graph)
    root = _CodeOnlyModule(body)
    gm = ModalGraphModule(root, {True: graphs[0], False: graphs[-1]}, class_name)
    for key, value in body.items():
        if key == "meta" or not hasattr(gm, key):
            setattr(gm, key, value)
    return gm


def trace_modes(model: nn.Module, example_input=None, route: str = "auto", *,
                codegen: bool = True) -> ModalGraphModule:
    """Trace ``model`` in train and in eval mode into one :class:`ModalGraphModule` (one graph when
    the traces are the same). ``model``'s mode is restored; the result starts in that mode.
    ``example_input`` is used only by backends that trace on a real input (torch.export);
    ``route`` is :func:`~utdsl.trace.trace_graph`'s. ``codegen=False`` leaves the module without a
    ``forward``, ``recompile()`` and graph switches doing nothing, until its caller, who edits the
    graphs, calls :meth:`ModalGraphModule.generate_code` (as ``compile`` does).

    The model is traced once, in eval mode, when the train trace would be the same: a symbolic
    trace can only differ between the modes where the forward reads some module's ``training``,
    so the eval trace records which module calls read it (:mod:`utdsl.same_modes`); each of those
    modules (one per distinct configuration) is traced alone in both modes, on the arguments it
    got, and when each gives the same graph both ways so does the model (timm's ViT attention reads
    ``training`` for its dropout probability, which is 0 either way). Otherwise, and on the export
    route, the model is traced again in train mode and the graphs compared."""
    was_training = model.training
    graphs: dict[bool, fx.Graph] = {}
    try:
        model.train(False)
        tracer = BackboneTracer()
        with TrainingReads(tracer, model) as reads:
            graphs[False] = trace_graph(model, example_input, route, tracer)
        traced_by_fx = getattr(tracer, "root", None) is model and reads.readers is not None
        if traced_by_fx and same_in_both_modes(model, reads.readers):
            graphs[True] = graphs[False]
        else:
            model.train(True)
            graphs[True] = trace_graph(model, example_input, route)
    finally:
        model.train(was_training)
    if graphs[True] is not graphs[False] and same_graph(graphs[True], graphs[False]):
        graphs[True] = graphs[was_training]
        graphs[False] = graphs[True]
    gm = ModalGraphModule(model, graphs, type(model).__name__, codegen=codegen)
    copy_model_attrs(model, gm)
    finish_module(gm, graphs[True])
    return gm

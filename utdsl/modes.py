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
(``compile`` and ``merge`` do). Deep copies keep both graphs; pickling, which fx does through the
generated code, keeps only the active one.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _copy_attr

from .trace import copy_model_attrs, trace_graph

__all__ = ["ModalGraphModule", "trace_modes"]


class ModalGraphModule(fx.GraphModule):
    """A GraphModule holding a train graph and an eval graph; ``train(mode)`` selects one."""

    def __init__(self, root: nn.Module, graphs: Mapping[bool, fx.Graph], class_name: str = "GraphModule"):
        graphs = {True: graphs[True], False: graphs[False]}
        active = graphs[bool(getattr(root, "training", True))]
        super().__init__(root, active, class_name)
        for graph in graphs.values():
            if graph is not active:
                _copy_targets(root, self, graph)
            graph.owning_module = self
        self._mode_graphs = graphs

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
        """Make ``mode``'s graph the active one (``self.graph``) without touching ``training``."""
        graph = self._mode_graphs[bool(mode)]
        if graph is not self.graph:
            self.graph = graph          # the setter regenerates forward

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

    def _deepcopy_init(self) -> Callable[..., None]:
        def init(copy: "ModalGraphModule", root: nn.Module, graph: fx.Graph) -> None:
            graphs: dict[bool, fx.Graph] = root.__dict__.get("_mode_graphs") or {True: graph, False: graph}
            ModalGraphModule.__init__(copy, root, graphs, type(self).__name__)

        return init


def _copy_targets(root: nn.Module, to: nn.Module, graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and not _has_attr(to, node.target):
            _copy_attr(root, to, node.target)


def _has_attr(module: nn.Module, target: str) -> bool:
    for item in target.split("."):
        if not hasattr(module, item):
            return False
        module = getattr(module, item)
    return True


def trace_modes(model: nn.Module) -> ModalGraphModule:
    """Trace ``model`` in train and in eval mode into one :class:`ModalGraphModule` (one graph when
    the traces are the same). ``model``'s mode is restored; the result starts in that mode."""
    was_training = model.training
    graphs: dict[bool, fx.Graph] = {}
    try:
        for mode in (True, False):
            model.train(mode)
            graphs[mode] = trace_graph(model)
    finally:
        model.train(was_training)
    if _code(graphs[True]) == _code(graphs[False]):
        graphs[True] = graphs[was_training]
        graphs[False] = graphs[True]
    gm = ModalGraphModule(model, graphs, type(model).__name__)
    copy_model_attrs(model, gm)
    return gm


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src

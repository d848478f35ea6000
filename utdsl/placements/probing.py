"""Trying an edit of a region before making it, for placements that change a region's token count.

Input: a traced, shape-propagated GraphModule, a module path and an ``edit(graph, region)`` that
edits a copy of the graph the way the placement will edit the real one (returning stand-ins for the
modules it calls). Output: a :class:`Probe` with every value of the edited copy on meta tensors (fake
tensors where an operation has no meta kernel), or the node where the run failed. A placement turns
a failure into a :class:`~utdsl.placements.base.SiteError`, so a region that cannot take the edit is
refused at compile time rather than failing with a shape error in forward.

Invariants: ``gm`` and its graph are not changed; parameters are swapped for meta stand-ins only for
the duration of the run; the run stops after the region's last node and the nodes its edit added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..trace import Region, module_path_of, region

__all__ = ["Probe", "probe", "depends_on", "describe_node"]

Edit = Callable[[fx.Graph, Region], dict]


@dataclass
class Probe:
    graph: fx.Graph                     # the edited copy
    region: Region                      # the region in the copy (before the edit)
    values: dict[fx.Node, Any] = field(default_factory=dict)
    failed: fx.Node | None = None
    error: Exception | None = None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        value = self.values.get(node)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _Stop(Exception):
    pass


class _Runner(fx.Interpreter):
    """Runs ``graph`` up to ``last``. Values outside ``zone`` (the region, the edit's nodes and what
    reads them) that shape propagation already knows are not computed but stood in for by empty
    meta tensors of their traced shape and strides, so a probe costs the region, not the model up
    to it."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph, stand_ins: dict, last: fx.Node,
                 zone: set[fx.Node] | None = None):
        super().__init__(gm, garbage_collect_values=False, graph=graph)
        self.stand_ins, self.last, self.zone, self.failed = stand_ins, last, zone, None

    def call_module(self, target, args, kwargs):
        if target in self.stand_ins:
            return self.stand_ins[target](*args, **kwargs)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if self.zone is not None and n not in self.zone and n.op not in ("placeholder", "output"):
            known = _like(n)
            if known is not None:
                return known
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        if n is self.last:
            self.env[n] = result
            raise _Stop
        return result


def probe(gm: fx.GraphModule, path: str, edit: Edit) -> Probe:
    """Copy ``gm``'s graph, apply ``edit`` to the copy's region ``path`` and run the copy."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    found = region(graph, path)
    stand_ins = edit(graph, found)
    last = _last_edited(graph, found)
    copied = set(copies.values())
    zone = set(found.nodes) | {n for n in graph.nodes if n not in copied}
    for node in graph.nodes:    # and whatever reads them: their shapes may change with the edit
        if any(arg in zone for arg in node.all_input_nodes):
            zone.add(node)
    inputs = []    # the traced inputs; the rest (traced as their defaults) take their defaults
    for node in graph.nodes:
        if node.op != "placeholder" or _like(node) is None:
            break
        inputs.append(_like(node))
    result = Probe(graph, found)
    for fake in (False, True):   # the fake-tensor fallback runs every node: no meta stand-ins there
        runner = _Runner(gm, graph, stand_ins, last, None if fake else zone)
        try:
            _run(gm, runner, inputs, fake)
        except _Stop:
            result.values, result.failed, result.error = dict(runner.env), None, None
            return result
        except Exception as error:  # a shape mismatch, or an op without a meta kernel
            result.values, result.failed, result.error = dict(runner.env), runner.failed, error
    return result


def _run(gm: fx.GraphModule, runner: _Runner, inputs: list, fake: bool) -> None:
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            runner.run(*[mode.from_tensor(torch.empty(t.shape, dtype=t.dtype)) for t in inputs])
        return
    from torch.nn.utils.stateless import _reparametrize_module

    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in (*gm.named_parameters(), *gm.named_buffers())}
    with _reparametrize_module(gm, stand_ins):
        runner.run(*inputs)


def _like(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if not hasattr(meta, "shape"):
        return None
    return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")


def _last_edited(graph: fx.Graph, found: Region) -> fx.Node:
    """The last node that is in the region or uses one of its outputs (an edit's output node)."""
    last, inside, outputs = found.nodes[-1], set(found.nodes), set(found.outputs)
    for node in graph.nodes:
        if node.op != "output" and (node in inside or outputs & set(node.all_input_nodes)):
            last = node
    return last


def depends_on(found: Region, source: fx.Node) -> set[fx.Node]:
    """The nodes of ``found`` computed (directly or not) from ``source``, with ``source``."""
    reached = {source}
    for node in found.nodes:
        if any(arg in reached for arg in node.all_input_nodes):
            reached.add(node)
    return reached


def describe_node(node: fx.Node) -> str:
    """``node`` as a user reads it: the operation and the module it is in."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    paths = module_path_of(node)
    where = f" in {paths[-1]}" if paths else ""
    return f"'{target}' ({node.name}){where}"

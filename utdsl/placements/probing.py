"""Trying an edit of a region before making it, for placements that change a region's token count.

Input: a traced, shape-propagated GraphModule, a module path and an ``edit(graph, region)`` that
edits a copy of the graph the way the placement will edit the real one (returning stand-ins for the
modules it calls). Output: a :class:`Probe` with every value of the edited copy on meta tensors (fake
tensors where an operation has no meta kernel), or the node where the run failed. A placement turns
a failure into a :class:`~utdsl.placements.base.SiteError`, so a region that cannot take the edit is
refused at compile time rather than failing with a shape error in forward.

Invariants: ``gm`` and its graph are not changed; the probe copies the region alone (its inputs stood
in for by meta tensors of their traced shapes), so its cost does not grow with the model; the
parameters it reads are swapped for meta stand-ins only for the duration of the run; the run stops
after the region's last node and the nodes its edit added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..shapes import op_memo
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
    """Runs ``graph`` up to ``last``; ``stand_ins`` replace the modules the edit calls."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph, stand_ins: dict, last: fx.Node):
        super().__init__(_NO_MODULES, garbage_collect_values=False, graph=graph)
        self.module = gm    # fx's __init__ lists every module of its module, which a probe never reads
        self.stand_ins, self.last, self.failed = stand_ins, last, None
        self.memo = op_memo(gm)     # a deep model's blocks probe alike: each operation runs once

    def call_module(self, target, args, kwargs):
        if target in self.stand_ins:
            return self.stand_ins[target](*args, **kwargs)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        key = None if n.op == "call_module" and n.target in self.stand_ins else self.memo.key(self, n)
        found = self.memo.get(key)
        try:
            result = found[0] if found is not None else super().run_node(n)
        except Exception:
            self.failed = n
            raise
        if found is None:
            self.memo.put(key, result, None, type(result))
        if n is self.last:
            self.env[n] = result
            raise _Stop
        return result


_NO_MODULES = nn.Module()


def probe(gm: fx.GraphModule, path: str, edit: Edit) -> Probe:
    """Copy region ``path`` of ``gm``'s graph alone (:func:`_local_copy`), apply ``edit`` to the
    copy and run it: the cost of a probe is the region's, not the model's."""
    graph, found, inputs = _local_copy(gm.graph, path)
    stand_ins = edit(graph, found)
    last = _last_edited(graph, found)
    result = Probe(graph, found)
    for fake in (False, True):   # the fake-tensor fallback, for an op without a meta kernel
        runner = _Runner(gm, graph, stand_ins, last)
        try:
            _run(gm, runner, inputs, fake)
        except _Stop:
            result.values, result.failed, result.error = dict(runner.env), None, None
            return result
        except Exception as error:  # a shape mismatch, or an op without a meta kernel
            result.values, result.failed, result.error = dict(runner.env), runner.failed, error
    return result


def _local_copy(source: fx.Graph, path: str) -> tuple[fx.Graph, Region, dict[fx.Node, Any]]:
    """A graph of region ``path``'s nodes alone, with its region, and the values its inputs start
    with: a tensor input is a placeholder holding an empty meta tensor of its traced shape and
    strides, a model input traced as its default holds that default, and any other value entering
    the region (a size read off a tensor) is recomputed from those. The region's outputs go to the
    graph's output, which stands for their users outside the region."""
    found = region(source, path)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    inputs: dict[fx.Node, Any] = {}

    def local(node: fx.Node) -> fx.Node:
        if node in copies:
            return copies[node]
        like = _like(node)
        if like is not None or node.op == "placeholder":
            copy = graph.placeholder(node.name)
            copy.meta = dict(node.meta)
            inputs[copy] = like if like is not None else (node.args[0] if node.args else None)
        else:
            copy = graph.node_copy(node, local)
        copies[node] = copy
        return copy

    for node in found.nodes:
        copies[node] = graph.node_copy(node, local)
    graph.output(tuple(copies[node] for node in found.outputs))
    return graph, region(graph, path), inputs


def _run(gm: fx.GraphModule, runner: _Runner, inputs: dict, fake: bool) -> None:
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            runner.run(initial_env={node: mode.from_tensor(torch.empty(v.shape, dtype=v.dtype))
                                    if isinstance(v, torch.Tensor) else v for node, v in inputs.items()})
        return
    from torch.nn.utils.stateless import _reparametrize_module

    names: dict[str, torch.Tensor] = {}
    for node in runner.graph.nodes:     # the parameters and buffers this graph reads, as meta tensors
        if node.op == "get_attr" and isinstance(node.target, str):
            value = _attribute(gm, node.target)
            if isinstance(value, torch.Tensor):
                names[node.target] = value
        elif node.op == "call_module" and node.target not in runner.stand_ins:
            module = gm.get_submodule(node.target)
            names.update((f"{node.target}.{n}", t) for n, t in
                         (*module.named_parameters(), *module.named_buffers()))
    stand_ins = {name: torch.empty_like(t, device="meta") for name, t in names.items()}
    with _reparametrize_module(gm, stand_ins):
        runner.run(initial_env=dict(inputs))


def _attribute(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, name)
    except AttributeError:
        return None


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

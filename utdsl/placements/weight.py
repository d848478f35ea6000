"""The ``weight`` placement: the tuner makes a new weight W' = U(W) that the operation uses in
place of W, wherever W is read: by a module call (an ``nn.Linear`` or ``nn.ConvNd`` leaf) or
functionally (``F.linear(x, self.qkv.weight, bias)`` in EVA-02, BEiT, SwinV2; every use in a graph
traced by torch.export).

Input: a site whose module holds a ``weight`` parameter of two or more dimensions that the graph
reads. Output: a :class:`WeightJoint` called on W at every read of it: each ``get_attr`` of W feeds
the joint, whose result every former user reads; a leaf call ``qkv(x)`` becomes
``F.linear(x, U(qkv.weight), qkv.bias)`` (``F.convNd`` with the conv's stride, padding, dilation
and groups), its nodes carrying the call's module stack, so later rules on the same site still find
it. With chunks (``attn.qkv{q, v}``) the units transform their rows of W and the other rows pass.

A site may also be a raw parameter of two or more dimensions (``pos_embed`` (1, N, D), a
relative-position table): the units see it as the matrix (N, D), its last dim the columns, and
every read of it reads U(W).

Sharing: a tuner class with shared state (VeRA's projections, FacT's factors) gets one instance of
that state per rule, built from every site the rule binds and registered once at
``<namespace>.shared.<tuner>_<line>``, or per declared tuner (``tuner proj = vera(r=256)``), built
from every site of every rule naming it, at ``<namespace>.shared.<tuner>_<name>``; units hold it
unregistered, so it is counted, saved and trained once (:func:`plan_shared`).

Activation form: once every rule is in, a joint whose only user is an ``F.linear`` call and whose
units have a ``linear_form`` (LoRA, VeRA, FacT, OFT) becomes one call ``joint(W, input=x,
bias=b)`` that computes the call's output without forming W' (:func:`lower_linear_calls`); it saves
no W' and skips the dense weight gradient. :func:`restore_weight_form` undoes it for merge.

Invariants: W keeps its name and value (the base model's state dict loads unchanged); merging is
exact by construction, W := U(W) (:mod:`utdsl.merge`), after which the leaf call is restored.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import tuners
from ..resolve import Binding
from ..trace import Region
from ..tuners import SiteInfo
from .base import FULL, Placement, SiteError, shared_module, site_device_dtype

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Weight", "WeightJoint", "plan_shared", "lower_linear_calls", "restore_weight_form",
           "FUNCTIONALIZED"]

#: node meta key of a leaf call rewritten as a functional call: the module path, for merge to restore
FUNCTIONALIZED = "utdsl_functionalized"
#: node meta key of a joint that computes its linear call's output: the call's function
LOWERED_CALL = "utdsl_lowered_linear"
#: node meta key of a joint's node: the site whose weight it transforms
WEIGHT_OF = "utdsl_weight_of"

_LINEARS = (F.linear, torch.ops.aten.linear.default)

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class WeightJoint(nn.Module):
    """W -> W': the units applied to their rows of W (all of it without chunks)."""

    def __init__(self, units: dict[str, nn.Module], chunk_indices: tuple[int, ...] | None, chunk_count: int,
                 matrix: tuple[int, int] | None = None):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.chunk_indices = chunk_indices
        self.chunk_count = chunk_count
        self.matrix = matrix   # a raw parameter's (rows, columns) view

    def extra_repr(self) -> str:
        return f"chunks={self.chunk_indices} of {self.chunk_count}" if self.chunk_indices else ""

    def forward(self, weight: torch.Tensor, input: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """W' = U(W); with ``input``, ``F.linear(input, W', bias)`` in the units' activation form."""
        if input is not None:
            return self.linear(input, weight, bias)
        if self.matrix is not None:
            return self.units[FULL](weight.reshape(self.matrix)).reshape(weight.shape)
        if self.chunk_indices is None:
            return self.units[FULL](weight)
        parts = list(weight.chunk(self.chunk_count, dim=0))
        for index, unit in zip(self.chunk_indices, self.units.values()):
            parts[index] = unit(parts[index])
        return torch.cat(parts, dim=0)

    @property
    def has_linear_form(self) -> bool:
        return all(getattr(unit, "linear_form", None) is not None for unit in self.units.values())

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.chunk_indices is None:
            return self.units[FULL].linear(x, weight, bias)
        units = dict(zip(self.chunk_indices, self.units.values()))
        size = weight.shape[0] // self.chunk_count
        if all(unit.linear_form == "additive" for unit in units.values()):
            y = F.linear(x, weight, bias)   # nothing saves y: its chunks take their deltas in place
            for index, unit in units.items():
                y.narrow(-1, index * size, size).add_(unit.output_delta(x).to(y.dtype))
            return y
        pieces, start = [], 0
        while start < self.chunk_count:   # a tuned chunk is one call, a run of untuned ones another
            stop = start + 1 if start in units else next(
                (i for i in range(start, self.chunk_count) if i in units), self.chunk_count)
            rows = slice(start * size, stop * size)
            piece_bias = bias[rows] if bias is not None else None
            call = units[start].linear if start in units else F.linear
            pieces.append(call(x, weight[rows], piece_bias))
            start = stop
        return torch.cat(pieces, dim=-1)


class Weight(Placement):
    name = "weight"
    summary = "W' = U(W), used wherever W is read; merges exactly (W := U(W))"
    single_use: ClassVar[bool] = False   # a weight read at several places is tuned at each

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            kind = _kind(found, binding.path) or type(module).__name__
            raise SiteError(f"weight needs a module with a matrix or conv weight; {kind} has none",
                            "select a linear or conv (e.g. attn.qkv), not a container")
        if not _reads(gm.graph, binding.path):
            raise SiteError("the model never reads this module's weight")
        if isinstance(module, tuple(_CONVS)) and module.padding_mode != "zeros":
            raise SiteError(f"a conv with padding_mode='{module.padding_mode}' cannot be called functionally")
        shape = tuple(weight.shape)
        chunks = binding.chunks
        if chunks is not None:
            if shape[0] % chunks.count:
                raise SiteError(f"{shape[0]} output rows do not split into {chunks.count} equal chunks")
            shape = (shape[0] // chunks.count, *shape[1:])
        extras = {"weight_shape": shape, "kind": "conv" if isinstance(module, tuple(_CONVS)) else "linear"}
        return SiteInfo(binding.path, shape[1], shape[0], extras), -1, -1

    @classmethod
    def analyze_parameter(cls, binding: Binding, gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        """The site of a raw parameter: its (rows, columns) matrix view."""
        parameter = gm.get_parameter(binding.path)
        if binding.chunks is not None:
            raise SiteError("a raw parameter has no chunks", "select the whole parameter")
        if not any(n.op == "get_attr" and n.target == binding.path for n in gm.graph.nodes):
            raise SiteError("the model never reads this parameter")
        shape = (math.prod(parameter.shape[:-1]), parameter.shape[-1])
        return SiteInfo(binding.path, shape[1], shape[0], {"weight_shape": shape, "kind": "parameter"}), -1, -1

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        joint = shared_module(gm, insertion.module_name, lambda: _build_joint(gm, insertion))
        gm.add_submodule(insertion.module_name, joint)
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == insertion.site]:
            _functionalize(gm, node)
        name = _parameter_name(insertion)
        for read in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]:
            value = _latest(read, insertion.site)
            users = list(value.users)
            with gm.graph.inserting_after(value):
                new = gm.graph.call_module(insertion.module_name, (value,))
            new.meta.update({k: v for k, v in value.meta.items() if k in ("nn_module_stack", "tensor_meta")})
            new.meta[WEIGHT_OF] = insertion.site
            for user in users:
                user.replace_input_with(value, new)

    @classmethod
    def finish(cls, gm: fx.GraphModule) -> None:
        lower_linear_calls(gm)


def _parameter_name(insertion: Insertion) -> str:
    """The parameter an insertion transforms: the raw parameter itself, or the module's weight."""
    return insertion.site if insertion.info.extras.get("kind") == "parameter" else f"{insertion.site}.weight"


def _kind(found: Region, path: str) -> str | None:
    """The class name of the module at ``path`` as traced (a traced-through module is a plain
    ``Module`` in the GraphModule)."""
    for node in found.nodes:
        for module_path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if module_path == path:
                return getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1])
    return None


def _reads(graph: fx.Graph, site: str) -> bool:
    return any((n.op == "call_module" and n.target == site) or (n.op == "get_attr" and n.target == f"{site}.weight")
               for n in graph.nodes)


def _latest(read: fx.Node, site: str) -> fx.Node:
    """The weight value after the joints an earlier weight rule on ``site`` put on this read."""
    value = read
    while len(value.users) == 1 and next(iter(value.users)).meta.get(WEIGHT_OF) == site:
        value = next(iter(value.users))
    return value


def lower_linear_calls(gm: fx.GraphModule) -> int:
    """``F.linear(x, joint(W), b)`` -> ``joint(W, input=x, bias=b)`` wherever the joint reads W
    directly, the call is its only user and its units have an activation form; returns how many."""
    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or WEIGHT_OF not in node.meta or len(node.users) != 1:
            continue
        joint, read, call = gm.get_submodule(node.target), node.args[0], next(iter(node.users))
        if not (isinstance(joint, WeightJoint) and joint.has_linear_form and read.op == "get_attr"):
            continue
        parts = _linear_parts(call)
        if parts is None or parts[1] is not node or parts[0] is node or parts[2] is node:
            continue
        with gm.graph.inserting_before(call):
            new = gm.graph.call_module(node.target, (read,), {"input": parts[0], "bias": parts[2]})
        new.meta.update(call.meta)
        new.meta.update({WEIGHT_OF: node.meta[WEIGHT_OF], LOWERED_CALL: call.target})
        call.replace_all_uses_with(new)
        gm.graph.erase_node(call)
        gm.graph.erase_node(node)
        lowered += 1
    return lowered


def restore_weight_form(gm: fx.GraphModule, graph: fx.Graph | None = None) -> None:
    """Undo :func:`lower_linear_calls`: ``F.linear(x, joint(W), b)`` again (merge folds that)."""
    graph = graph if graph is not None else gm.graph
    for node in list(graph.nodes):
        function = node.meta.get(LOWERED_CALL)
        if node.op != "call_module" or function is None:
            continue
        with graph.inserting_before(node):
            joint = graph.call_module(node.target, (node.args[0],))
            call = graph.call_function(function, (node.kwargs["input"], joint, node.kwargs["bias"]))
        joint.meta.update({k: node.meta[k] for k in ("nn_module_stack", WEIGHT_OF) if k in node.meta})
        call.meta.update({k: v for k, v in node.meta.items() if k not in (LOWERED_CALL, WEIGHT_OF)})
        node.replace_all_uses_with(call)
        graph.erase_node(node)


def _linear_parts(call: fx.Node) -> tuple | None:
    """(input, weight, bias) of a linear call node, or None for any other node."""
    if call.op != "call_function" or call.target not in _LINEARS:
        return None
    names = ("input", "weight", "bias")
    values = list(call.args) + [call.kwargs.get(name) for name in names[len(call.args):]]
    if len(values) != 3 or set(call.kwargs) - set(names[len(call.args):]):
        return None
    return tuple(values)


def _functionalize(gm: fx.GraphModule, node: fx.Node) -> None:
    """``qkv(x)`` -> ``F.linear(x, qkv.weight, qkv.bias)`` (or the conv's functional call)."""
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.Linear):
        function, extra = F.linear, {}
    elif type(module) in _CONVS:
        function = _CONVS[type(module)]
        extra = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    else:
        raise SiteError(f"cannot call a {type(module).__name__} with another weight")
    stack = dict(node.meta.get("nn_module_stack") or {})
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        call = gm.graph.call_function(function, (node.args[0], weight, bias), extra)
    for new in (weight, bias, call):
        if new is not None:
            new.meta["nn_module_stack"] = stack
    call.meta.update({k: v for k, v in node.meta.items() if k != "nn_module_stack"})
    call.meta[FUNCTIONALIZED] = node.target
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _build_joint(gm: fx.GraphModule, insertion: Insertion) -> WeightJoint:
    tuner_cls = tuners.get(insertion.tuner)
    device, dtype = site_device_dtype(gm, insertion.site)
    shared = None
    shared_name = insertion.info.extras.get("shared_name")
    if shared_name is not None:
        shared = shared_module(gm, shared_name, lambda: _build_shared(gm, insertion, tuner_cls, device, dtype))
        gm.add_submodule(shared_name, shared)
    weight = gm.get_parameter(_parameter_name(insertion))
    matrix = insertion.info.extras["weight_shape"] if insertion.info.extras.get("kind") == "parameter" else None
    if matrix is not None:
        weight = weight.reshape(matrix)
    chunks = insertion.chunks
    rows = weight.detach().chunk(chunks.count, dim=0) if chunks else (weight.detach(),)
    units = {}
    for label, index in zip(chunks.labels, chunks.indices) if chunks else ((FULL, 0),):
        with torch.device(device):
            unit = tuner_cls.build(insertion.args, insertion.info, shared).to(dtype)
        if getattr(tuner_cls, "needs_weight_init", False):
            unit.init_from_weight(rows[index])
        units[label] = unit
    return WeightJoint(units, chunks.indices if chunks else None, chunks.count if chunks else 1,
                       tuple(matrix) if matrix is not None else None)


def _build_shared(gm, insertion, tuner_cls, device, dtype) -> nn.Module:
    with torch.device(device):
        return tuner_cls.build_shared(insertion.args, list(insertion.info.extras["shared_sites"])).to(dtype)


def plan_shared(insertions: list[Insertion], namespace: str) -> int:
    """Give every weight insertion whose tuner shares state the name of its rule's shared module
    and every site of that rule (in ``info.extras``); return the shared parameters, counted once."""
    groups: dict[tuple[int | str, str], list[Insertion]] = {}
    for insertion in insertions:
        tuner_cls = tuners.get(insertion.tuner)
        if insertion.placement == Weight.name and getattr(tuner_cls, "shared", None) is not None:
            group = insertion.declaration or insertion.rule_line
            groups.setdefault((group, insertion.tuner), []).append(insertion)
    total = 0
    for (group, tuner), members in groups.items():
        name = f"{namespace}.shared.{tuner}_{group}"
        sites = tuple(i.info for i in members)
        for insertion in members:
            insertion.info.extras.update(shared_name=name, shared_sites=sites)
        with torch.device("meta"):
            state = tuners.get(tuner).build_shared(members[0].args, list(sites))
        total += sum(p.numel() for p in state.parameters()) if state is not None else 0
    return total

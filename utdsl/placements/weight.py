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

Sharing: a tuner class with shared state (VeRA's projections, FacT's factors) gets one instance of
that state per rule, built from every site the rule binds and registered once at
``<namespace>.shared.<tuner>_<line>``; units hold it unregistered, so it is counted, saved and
trained once (:func:`plan_shared`).

Invariants: W keeps its name and value (the base model's state dict loads unchanged); merging is
exact by construction, W := U(W) (:mod:`utdsl.merge`), after which the leaf call is restored.
"""

from __future__ import annotations

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

__all__ = ["Weight", "WeightJoint", "plan_shared", "FUNCTIONALIZED"]

#: node meta key of a leaf call rewritten as a functional call: the module path, for merge to restore
FUNCTIONALIZED = "utdsl_functionalized"

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class WeightJoint(nn.Module):
    """W -> W': the units applied to their rows of W (all of it without chunks)."""

    def __init__(self, units: dict[str, nn.Module], chunk_indices: tuple[int, ...] | None, chunk_count: int):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.chunk_indices = chunk_indices
        self.chunk_count = chunk_count

    def extra_repr(self) -> str:
        return f"chunks={self.chunk_indices} of {self.chunk_count}" if self.chunk_indices else ""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.chunk_indices is None:
            return self.units[FULL](weight)
        parts = list(weight.chunk(self.chunk_count, dim=0))
        for index, unit in zip(self.chunk_indices, self.units.values()):
            parts[index] = unit(parts[index])
        return torch.cat(parts, dim=0)


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
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        joint = shared_module(gm, insertion.module_name, lambda: _build_joint(gm, insertion))
        gm.add_submodule(insertion.module_name, joint)
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == insertion.site]:
            _functionalize(gm, node)
        name = f"{insertion.site}.weight"
        for read in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]:
            value = _latest(read, insertion.site)
            users = list(value.users)
            with gm.graph.inserting_after(value):
                new = gm.graph.call_module(insertion.module_name, (value,))
            new.meta.update({k: v for k, v in value.meta.items() if k in ("nn_module_stack", "tensor_meta")})
            new.meta["utdsl_weight_of"] = insertion.site
            for user in users:
                user.replace_input_with(value, new)


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
    while len(value.users) == 1 and next(iter(value.users)).meta.get("utdsl_weight_of") == site:
        value = next(iter(value.users))
    return value


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
    weight = gm.get_parameter(f"{insertion.site}.weight")
    chunks = insertion.chunks
    rows = weight.detach().chunk(chunks.count, dim=0) if chunks else (weight.detach(),)
    units = {}
    for label, index in zip(chunks.labels, chunks.indices) if chunks else ((FULL, 0),):
        with torch.device(device):
            unit = tuner_cls.build(insertion.args, insertion.info, shared).to(dtype)
        if getattr(tuner_cls, "needs_weight_init", False):
            unit.init_from_weight(rows[index])
        units[label] = unit
    return WeightJoint(units, chunks.indices if chunks else None, chunks.count if chunks else 1)


def _build_shared(gm, insertion, tuner_cls, device, dtype) -> nn.Module:
    with torch.device(device):
        return tuner_cls.build_shared(insertion.args, list(insertion.info.extras["shared_sites"])).to(dtype)


def plan_shared(insertions: list[Insertion], namespace: str) -> int:
    """Give every weight insertion whose tuner shares state the name of its rule's shared module
    and every site of that rule (in ``info.extras``); return the shared parameters, counted once."""
    groups: dict[tuple[int, str], list[Insertion]] = {}
    for insertion in insertions:
        tuner_cls = tuners.get(insertion.tuner)
        if insertion.placement == Weight.name and getattr(tuner_cls, "shared", None) is not None:
            groups.setdefault((insertion.rule_line, insertion.tuner), []).append(insertion)
    total = 0
    for (line, tuner), members in groups.items():
        name = f"{namespace}.shared.{tuner}_{line}"
        sites = tuple(i.info for i in members)
        for insertion in members:
            insertion.info.extras.update(shared_name=name, shared_sites=sites)
        with torch.device("meta"):
            state = tuners.get(tuner).build_shared(members[0].args, list(sites))
        total += sum(p.numel() for p in state.parameters()) if state is not None else 0
    return total

"""The ``sequential`` placement: y = h + U(h), or y = U(h) for a residual-free tuner (affine), a
tuner after the frozen operation h = OP(x).

Input: a site whose region gives one tensor h that later nodes use (any inputs). Output: a
:class:`SequentialJoint` called on h right after it; every use of h outside the region reads y,
per chunk y_c = h_c + U_c(h_c) (or U_c(h_c)) when the rule names chunks of h's channels, the
other chunks passing unchanged.

Invariants: those of :mod:`utdsl.placements.joint`; the tuner reads only h.
"""

from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import tuners
from ..resolve import Binding
from ..trace import Region
from ..tuners import SiteInfo
from ..tuners.affine import Affine, ScaleCheck
from .base import FULL, Placement
from .joint import Joint, insert_joint, joined_output, split_chunks

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Sequential", "SequentialJoint"]


class SequentialJoint(Joint):
    """y = h + U(h), or U(h) when the tuner is residual-free (per chunk).

    A residual-free tuner class with ``chunked_forward(units, indices, count, h)`` (affine: one
    full-width map, identity on the untuned chunks) runs chunked sites in one call, without
    splitting and re-joining h."""

    def __init__(self, *args, residual: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual = residual
        fused = getattr(type(next(iter(self.units.values()))), "chunked_forward", None)
        self._fused = fused if self.chunk_indices is not None and not residual else None

    #: (name, argument) of :data:`utdsl.tuners.affine.RECOMPUTE` when the site is that op and
    #: the unit recomputes its input from the op's input (``insert`` sets it)
    op: tuple | None = None

    def forward(self, h: torch.Tensor, source: torch.Tensor | None = None, params: tuple = ()) -> torch.Tensor:
        if self.residual:
            return self._combine(h, lambda unit, part: part + unit(part))
        if source is not None and self.op is not None and self.chunk_indices is None and self.out_axis == -1:
            return self.units[FULL](h, source, self.op, params)
        if self._fused is not None:
            fused = self._fused
            units = list(self.units.values())
            return self._combine_full(h, lambda full: fused(units, self.chunk_indices, self.chunk_count, full))
        return self._combine(h, lambda unit, part: unit(part))


class Sequential(Placement):
    name = "sequential"
    summary = "y = h + U(h), or y = U(h) for residual-free tuners (affine)"

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        shape, axis = joined_output(binding, found, module)
        info = SiteInfo(binding.path, shape[axis], shape[axis], {"in_shape": shape, "out_shape": shape})
        return split_chunks(info, binding.chunks, chunked_input=True), axis, axis

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        tuner_cls = tuners.get(insertion.tuner)
        node = insert_joint(gm, insertion, found, functools.partial(SequentialJoint, residual=tuner_cls.residual), ())
        found_op = _recomputable(gm, found) if getattr(tuner_cls, "recomputes_input", False) else None
        if found_op is not None and insertion.chunks is None and insertion.out_axis == -1:
            joint = gm.get_submodule(insertion.module_name)
            op, source, params = found_op
            if joint.op in (None, op):
                joint.op = op
                with gm.graph.inserting_before(node):  # parameters named by path are read here
                    params = tuple(gm.graph.get_attr(p) if isinstance(p, str) else p for p in params)
                node.kwargs = {"source": source, "params": params}

    @classmethod
    def finish(cls, gm: fx.GraphModule) -> None:
        """Units that may keep their output for the backward (``keep_output``: affine) stop doing
        so where a later op writes into that output in place: autograd would refuse the backward.
        Those that keep it share one ``scale_check`` (one device read a forward for all)."""
        keeping = []
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            joint = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(joint, SequentialJoint):
                continue
            written = _written_in_place(gm, node)
            for unit in joint.units.values():
                if getattr(unit, "keep_output", False):
                    if written:
                        unit.keep_output = False
                    else:
                        keeping.append(unit)
        keeping = [unit for unit in keeping if isinstance(unit, Affine)]
        check = ScaleCheck(keeping) if keeping else None
        for unit in keeping:
            unit.scale_check = check


#: ops whose result may share the memory of their first input
_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "expand", "expand_as", "contiguous", "view_as", "reshape_as", "narrow", "select", "unbind",
                 "split", "chunk", "movedim", "t", "unfold", "detach", "type_as", "to", "float", "__getitem__"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.movedim, torch.chunk, torch.split, torch.unbind, torch.narrow,
                   torch.select, torch.t}
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _written_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether an op after ``node`` may write into its value in place: an ``inplace`` module or
    function, a trailing-underscore method, an augmented assignment, reached through views and
    parameter-free modules (which may return their input: Identity, Dropout in eval, DropPath)."""
    seen, todo = set(), [node]
    while todo:
        value = todo.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            first = user.args[0] if user.args else None
            if user.op == "call_module":
                module = gm.get_submodule(user.target)
                if getattr(module, "inplace", False) is True and first is value:
                    return True
                if next(module.parameters(recurse=True), None) is None and first is value:
                    todo.append(user)
            elif user.op == "call_method":
                if user.target.endswith("_") and not user.target.endswith("__") and first is value:
                    return True
                if user.target in _VIEW_METHODS and first is value:
                    todo.append(user)
            elif user.op == "call_function":
                name = getattr(user.target, "__name__", "")
                if first is value and (user.kwargs.get("inplace") is True or user.target in _IN_PLACE_OPERATORS
                                       or (name.endswith("_") and not name.endswith("__"))):
                    return True
                if user.target in _VIEW_FUNCTIONS and first is value:
                    todo.append(user)
    return False


#: activation modules an affine recomputes its input from: type -> (name, argument)
_ACTIVATION_MODULES = {nn.GELU: lambda m: ("gelu", m.approximate), nn.SiLU: lambda m: ("silu", ""),
                       nn.ReLU: lambda m: ("relu", ""), nn.Tanh: lambda m: ("tanh", ""),
                       nn.Sigmoid: lambda m: ("sigmoid", "")}


def _recomputable(gm: fx.GraphModule, found: Region) -> tuple[tuple, fx.Node, tuple] | None:
    """(op, input, parameters as nodes or paths) when the site computes its value from a tensor
    that something keeps for its backward anyway: an elementwise activation module (``nn.GELU``...) or
    ``F.layer_norm`` on parameters read by the site (they keep their input), or an attention's
    output projection (``nn.Linear``) on the heads of ``scaled_dot_product_attention``'s output
    (which keeps it), recomputed from that output; else None."""
    nodes = [n for n in found.nodes if n.op != "get_attr"]
    if len(nodes) != 1 or not isinstance(nodes[0].args[0] if nodes[0].args else None, fx.Node):
        return None
    (node,) = nodes
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = gm.get_submodule(node.target)
        describe = _ACTIVATION_MODULES.get(type(module))
        if describe is not None and not getattr(module, "inplace", False):
            return describe(module), node.args[0], ()
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
            and type(gm.get_submodule(node.target)) is nn.Linear:
        attention = _attention_output(gm, node.args[0])
        if attention is not None:
            output, dims = attention
            names = tuple(f"{node.target}.{name}" for name, _ in
                          gm.get_submodule(node.target).named_parameters(recurse=False))
            return ("attention_projection", dims), output, names
    if node.op == "call_function" and node.target is F.layer_norm:
        values = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args)) | dict(node.kwargs)
        params = (values.get("weight"), values.get("bias"))
        if all(p is None or (isinstance(p, fx.Node) and p.op == "get_attr") for p in params) \
                and isinstance(values.get("normalized_shape"), (tuple, list)):
            return ("layer_norm", (tuple(values["normalized_shape"]), values.get("eps", 1e-5))), values["input"], params
    return None


def _attention_output(gm: fx.GraphModule, value: fx.Node) -> tuple[fx.Node, tuple[int, int]] | None:
    """(attention node, dims) when ``value`` is ``scaled_dot_product_attention``'s output with
    axes ``dims`` swapped and reshaped to (..., channels), through ``nn.Identity`` modules
    (timm's ``x.transpose(1, 2).reshape(B, N, C)``, then ``attn.norm``); else None."""
    while value.op == "call_module" and type(gm.get_submodule(value.target)) is nn.Identity:
        value = value.args[0]
    if not (value.op == "call_method" and value.target in ("reshape", "view")):
        return None
    swapped = value.args[0]
    if not (isinstance(swapped, fx.Node) and swapped.op == "call_method" and swapped.target == "transpose"
            and len(swapped.args) == 3 and all(isinstance(a, int) for a in swapped.args[1:])):
        return None
    output = swapped.args[0]
    if isinstance(output, fx.Node) and output.op == "call_function" \
            and output.target is F.scaled_dot_product_attention:
        return output, tuple(swapped.args[1:])
    return None

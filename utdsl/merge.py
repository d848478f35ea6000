"""``utdsl.merge``: fold mergeable tuners into the weights of the operation they tune, for
inference at the base model's speed.

Folded: a ``parallel lowrank`` on a linear (W += ΔW on the tuned rows); a ``sequential affine``
right after a linear, conv or layer norm (its output channels scaled and shifted), or else right
before a linear that is its only user (that linear's input columns scaled, its bias shifted: IA3
on an activation). Other tuners, and affines with no weight beside them, stay in the graph. The
input model is not modified. A model with a train and an eval graph has the same tuners removed
from both.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .joints import FULL, ParallelJoint, SequentialJoint
from .modes import ModalGraphModule
from .verify import compiled_info

__all__ = ["merge"]

_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d)


def merge(model: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``model`` with every mergeable tuner folded in and removed from the graph."""
    merged = copy.deepcopy(model)
    info = compiled_info(merged)
    mergeable = {i.module_name for i in info.plan.insertions if i.mergeable}
    folded: set[str] = set()
    graphs = merged.each_graph() if isinstance(merged, ModalGraphModule) else [merged.graph]
    for index, graph in enumerate(graphs):
        for node in list(graph.nodes):
            if node.op != "call_module" or node.target not in mergeable:
                continue
            if index == 0:  # weights fold once, decided on the first graph; the others follow it
                joint = merged.get_submodule(node.target)
                if isinstance(joint, ParallelJoint):
                    done = _fold_lowrank(merged, joint, node)
                else:
                    done = _fold_affine_after(merged, joint, node) or _fold_affine_before(merged, joint, node)
                if done:
                    folded.add(node.target)
            if node.target in folded:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        graph.lint()
        merged.recompile()
    for target in folded:
        merged.delete_submodule(target)
    merged.meta["utdsl_merged"] = True
    return merged


def _tuned_rows(joint: nn.Module, out: int):
    """(unit, slice of output channels) for each unit of a joint on an op with ``out`` outputs."""
    if joint.chunk_indices is None:
        return [(joint.units[FULL], slice(0, out))]
    size = out // joint.chunk_count
    return [(unit, slice(i * size, (i + 1) * size)) for i, unit in joint._labelled_units()]


@torch.no_grad()
def _fold_lowrank(gm: fx.GraphModule, joint: ParallelJoint, node: fx.Node) -> bool:
    h, x = node.args
    if h.op != "call_module" or h.args[:1] != (x,):
        return False
    linear = gm.get_submodule(h.target)
    if not isinstance(linear, nn.Linear):
        return False
    for unit, rows in _tuned_rows(joint, linear.out_features):
        linear.weight[rows] += unit.merge_delta().to(linear.weight.dtype)
    return True


def _output_parameters(gm: fx.GraphModule, h: fx.Node):
    """(weight, bias, owner) of the op that produced ``h`` when an affine on its output channels can
    be folded into it; ``owner`` is the module (None for a functional call whose bias must exist)."""
    if h.op == "call_module":
        module = gm.get_submodule(h.target)
        if isinstance(module, nn.LayerNorm) and not module.elementwise_affine:
            return None
        if isinstance(module, (nn.Linear, nn.LayerNorm, *_CHANNELS_FIRST)):
            return module.weight, module.bias, module
        return None
    if h.op == "call_function" and h.target in (F.linear, F.layer_norm):
        names = ("input", "weight", "bias") if h.target is F.linear else ("input", "normalized_shape", "weight", "bias")
        values = dict(zip(names, h.args)) | dict(h.kwargs)
        weight, bias = values.get("weight"), values.get("bias")
        if all(isinstance(v, fx.Node) and v.op == "get_attr" for v in (weight, bias)):
            return gm.get_parameter(weight.target), gm.get_parameter(bias.target), None
    return None


@torch.no_grad()
def _fold_affine_after(gm: fx.GraphModule, joint: SequentialJoint, node: fx.Node) -> bool:
    found = _output_parameters(gm, node.args[0])
    if found is None or joint.residual:
        return False
    weight, bias, owner = found
    if isinstance(owner, _CHANNELS_FIRST) != (joint.out_axis == 1):
        return False
    if bias is None:
        owner.bias = bias = nn.Parameter(torch.zeros_like(weight[:, 0] if weight.dim() > 1 else weight),
                                         requires_grad=False)
    for unit, rows in _tuned_rows(joint, weight.shape[0]):
        scale, shift = unit.merge_delta()
        if scale is not None:
            weight[rows] *= scale.reshape((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)
            bias[rows] *= scale.to(bias.dtype)
        if shift is not None:
            bias[rows] += shift.to(bias.dtype)
    return True


def _passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An inference no-op between an affine and the linear it folds into."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0.0)


@torch.no_grad()
def _fold_affine_before(gm: fx.GraphModule, joint: SequentialJoint, node: fx.Node) -> bool:
    """y = W (s * a + t) + b = (W diag(s)) a + (W t + b), for an affine whose only user is a linear."""
    if joint.residual or joint.chunk_indices is not None or joint.out_axis != -1:
        return False
    value = node
    while len(value.users) == 1 and _passthrough(gm, next(iter(value.users))):
        value = next(iter(value.users))
    if len(value.users) != 1:
        return False
    (user,) = value.users
    if user.op != "call_module" or user.args != (value,) or user.kwargs:
        return False
    linear = gm.get_submodule(user.target)
    if not isinstance(linear, nn.Linear):
        return False
    scale, shift = joint.units[FULL].merge_delta()
    weight = linear.weight
    if shift is not None:
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                       requires_grad=False)
        linear.bias += weight @ shift.to(weight.dtype)
    if scale is not None:
        weight *= scale.to(weight.dtype)
    return True

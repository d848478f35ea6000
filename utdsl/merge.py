"""``utdsl.merge``: fold mergeable tuners into the weights of the operation they tune, for
inference at the base model's speed.

Folded: a ``parallel lowrank`` on a linear (W += ΔW on the tuned rows) or on a Conv2d with
groups=1 (ΔW = up ∘ down, a conv-shaped update); a ``sequential affine`` right after a linear,
conv, layer norm or plain batch norm (its output channels scaled and shifted), or else right before
a linear that is its only user (that linear's input columns scaled, its bias shifted: IA3 on an
activation). A linear may be a module used functionally (``F.linear(x, qkv.weight, bias)``, its
weight read there alone): the weight folds in place, and an affine's scale and shift fold into the
bias's parameters (``q_bias``, ``v_bias``) only when the pieces that are not parameters (the
``k_bias`` buffer) keep their values; otherwise the affine stays in the graph. Other tuners, and
affines with no weight beside them, stay in the graph. The input model is not modified. A model
with a train and an eval graph has the same tuners removed from both.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .modes import ModalGraphModule
from .placements.base import FULL
from .placements.parallel import ParallelJoint
from .placements.sequential import SequentialJoint
from .placements.weight import FUNCTIONALIZED, WeightJoint
from .verify import compiled_info

__all__ = ["merge"]

_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d)
#: batch norms with nothing after the affine (timm's BatchNormAct2d also activates: not these)
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
            if index == 0 and node.target not in folded:  # weights fold once, on the first graph
                joint = merged.get_submodule(node.target)
                if isinstance(joint, WeightJoint):
                    done = _fold_weight(merged, joint, node)
                elif isinstance(joint, ParallelJoint):
                    done = _fold_lowrank(merged, joint, node)
                else:
                    done = _fold_affine_after(merged, joint, node) or _fold_affine_before(merged, joint, node)
                if done:
                    folded.add(node.target)
            if node.target in folded:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        _restore_leaf_calls(graph)
        graph.lint()
        merged.recompile()
    for target in folded:
        merged.delete_submodule(target)
    for name in _unused_shared(info.plan, folded):
        merged.delete_submodule(name)
    merged.meta["utdsl_merged"] = True
    return merged


@torch.no_grad()
def _fold_weight(gm: fx.GraphModule, joint: WeightJoint, node: fx.Node) -> bool:
    """W := U(W): exact by construction (the joints nearer the weight are folded first)."""
    read = node.args[0]
    if not (isinstance(read, fx.Node) and read.op == "get_attr"):
        return False
    weight = gm.get_parameter(read.target)
    weight.copy_(joint(weight.detach()))
    return True


def _restore_leaf_calls(graph: fx.Graph) -> None:
    """``F.linear(x, qkv.weight, qkv.bias)`` that the weight placement made of ``qkv(x)`` is
    ``qkv(x)`` again once nothing stands between the call and its weight."""
    for node in list(graph.nodes):
        target = node.meta.get(FUNCTIONALIZED)
        if target is None or node.op != "call_function":
            continue
        x, weight, bias = node.args[:3]
        reads = [weight] + ([bias] if bias is not None else [])
        if not all(isinstance(r, fx.Node) and r.op == "get_attr" and r.target.startswith(target + ".")
                   for r in reads):
            continue
        with graph.inserting_before(node):
            call = graph.call_module(target, (x,))
        call.meta.update({k: v for k, v in node.meta.items() if k != FUNCTIONALIZED})
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        for r in reads:
            if not r.users:
                graph.erase_node(r)


def _unused_shared(plan, folded: set[str]) -> set[str]:
    """Shared tuner state (VeRA, FacT) whose every unit was folded away."""
    used: dict[str, bool] = {}
    for insertion in plan.insertions:
        name = insertion.info.extras.get("shared_name")
        if name is not None:
            used[name] = used.get(name, False) or insertion.module_name not in folded
    return {name for name, still in used.items() if not still}


def _tuned_rows(joint: nn.Module, out: int):
    """(unit, slice of output channels) for each unit of a joint on an op with ``out`` outputs."""
    if joint.chunk_indices is None:
        return [(joint.units[FULL], slice(0, out))]
    size = out // joint.chunk_count
    return [(unit, slice(i * size, (i + 1) * size)) for i, unit in joint._labelled_units()]


@torch.no_grad()
def _fold_lowrank(gm: fx.GraphModule, joint: ParallelJoint, node: fx.Node) -> bool:
    h, x = node.args
    functional = _functional_linear(gm, h)
    if functional is not None:
        weight = functional[0]
        if _linear_values(h)["input"] is not x:
            return False
    else:
        if h.op != "call_module" or h.args[:1] != (x,):
            return False
        linear = gm.get_submodule(h.target)
        conv = isinstance(linear, nn.Conv2d) and getattr(joint.units[FULL], "native_layout", False)
        if conv and linear.groups != 1:
            return False  # ΔW = up ∘ down spans every input channel; a grouped weight cannot hold it
        if not (isinstance(linear, nn.Linear) or conv):
            return False
        weight = linear.weight
    for unit, rows in _tuned_rows(joint, weight.shape[0]):
        weight[rows] += unit.merge_delta().to(weight.dtype)
    return True


def _linear_values(h: fx.Node) -> dict:
    return dict(zip(("input", "weight", "bias"), h.args)) | dict(h.kwargs)


def _functional_linear(gm: fx.GraphModule, h: fx.Node):
    """(weight, bias pieces) of ``F.linear(x, weight, bias)`` whose weight is a parameter read by
    this call alone (a module used functionally, e.g. timm's EVA/BEiT/SwinV2 ``qkv``), else None.
    The bias pieces are ``[(tensor, is_parameter)]`` in output order: a parameter or buffer, or the
    ``torch.cat`` of some (``q_bias``, the ``k_bias`` zeros, ``v_bias``); None for a bias built
    otherwise, ``[]`` for no bias."""
    if h.op != "call_function" or h.target is not F.linear:
        return None
    values = _linear_values(h)
    weight, bias = values.get("weight"), values.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    reads = [n for n in h.graph.nodes if n.op == "get_attr" and n.target == weight.target]
    if sum(len(n.users) for n in reads) != 1:
        return None  # the weight is shared: folding would change its other uses
    if bias is None:
        return gm.get_parameter(weight.target), []
    parts = [bias]
    if isinstance(bias, fx.Node) and bias.op == "call_function" and bias.target is torch.cat:
        if len(bias.users) != 1:
            return None
        parts, dim = bias.args[0], (bias.args[1:] or (bias.kwargs.get("dim", 0),))[0]
        if dim not in (0, -1) or not isinstance(parts, (list, tuple)):
            return None
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" and len(p.users) == 1 for p in parts):
        return None
    pieces = []
    for part in parts:
        tensor = gm.get_parameter(part.target) if _is_parameter(gm, part.target) else gm.get_buffer(part.target)
        pieces.append((tensor, _is_parameter(gm, part.target)))
    return gm.get_parameter(weight.target), pieces


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def _fold_affine_after_functional(joint: SequentialJoint, weight: torch.Tensor, pieces: list) -> bool:
    """Scale the rows of ``weight`` and map the bias b -> s * b + t, piece by piece; a piece that is
    not a parameter (timm's ``k_bias`` buffer of zeros, not saved) must keep its value, or nothing
    is folded."""
    bias = torch.cat([t for t, _ in pieces]) if pieces else torch.zeros_like(weight[:, 0])
    new_bias, scales = bias.clone(), torch.ones_like(bias)
    for unit, rows in _tuned_rows(joint, weight.shape[0]):
        scale, shift = unit.merge_delta()
        if scale is not None:
            scales[rows] = scale.to(bias.dtype)
            new_bias[rows] *= scale.to(bias.dtype)
        if shift is not None:
            new_bias[rows] += shift.to(bias.dtype)
    if not pieces and torch.count_nonzero(new_bias):
        return False
    start, updates = 0, []
    for tensor, is_parameter in pieces:
        new = new_bias[start:start + tensor.shape[0]]
        start += tensor.shape[0]
        if not torch.equal(new, tensor):
            if not is_parameter:
                return False
            updates.append((tensor, new))
    weight *= scales.reshape((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)
    for tensor, new in updates:
        tensor.copy_(new)
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
        if type(module) in _PLAIN_BATCH_NORMS and module.affine:  # s (g x^ + b) + t, batch or running x^
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
    if joint.residual:
        return False
    functional = _functional_linear(gm, node.args[0])
    if functional is not None:
        return joint.out_axis == -1 and _fold_affine_after_functional(joint, *functional)
    found = _output_parameters(gm, node.args[0])
    if found is None:
        return False
    weight, bias, owner = found
    if isinstance(owner, (*_CHANNELS_FIRST, *_PLAIN_BATCH_NORMS)) != (joint.out_axis == 1):
        return False
    if bias is None:
        owner.bias = bias = nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=False)
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

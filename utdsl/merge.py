"""``utdsl.merge``: fold every tuner that is linear in what it tunes into the weights of the
operation beside it, for inference at the base model's speed with the base model's graph.

Folded (exactly: outputs equal within float rounding, in train and eval mode):

- ``weight`` tuners: W := U(W), and the leaf call ``qkv(x)`` is restored.
- ``parallel lowrank`` on a linear, or on a Conv2d with groups=1 (a conv-shaped ΔW); a ``parallel
  adapter`` that is linear (``activation=identity``, no norm, no dropout) on a linear or a 1x1
  conv: W += s U D, b += s (U b_D + b_U), on the tuned rows.
- A ``sequential affine`` (y = s h + t) or linear adapter (y = h + M h + c, M = s U D,
  c = s (U b_D + b_U)) on the output of a linear, a conv (groups=1 for an adapter), or, for the
  affine, a layer norm or plain batch norm: the op's output rows become s W and s b + t, or
  W + M W and b + M b + c, per chunk. Between the op and the tuner the value may pass through
  nodes that only move axes or do nothing (``flatten``, ``transpose``, ``permute``, Identity,
  Dropout(0)), each with one user: timm's PatchEmbed (conv, flatten, transpose, Identity norm) and
  LayerNorm2d (permute, ``F.layer_norm``, permute) fold so.
- Otherwise, a sequential affine or linear adapter without chunks whose only user is a linear
  (through Identity or Dropout(0)): that linear's input columns, W diag(s) or W + W M, its bias
  b + W t or b + W c (IA3 on an MLP activation).

A linear may be a module used functionally (``F.linear(x, qkv.weight, cat(q_bias, k_bias,
v_bias))``, its weight read there alone): the weight folds in place and the bias into its parameter
pieces, only when the pieces that are not parameters (timm's ``k_bias`` buffer, zeros, not in the
state dict) keep their values; a shift on the k rows therefore stays in the graph. Everything else
stays in the graph: nonlinear adapters, affines with no weight before them (timm's Identity ``norm``
of average-pooled models: the next op, a layer norm, cannot absorb them) and after a norm whose
normalised shape is not one axis, tuners on ops whose weight has another use. A fold of a shift into
an op without a bias gives it one: the names of such new parameters, absent from the base model's
state dict, are ``merged.meta["utdsl_merge_added"]``. The input model is not modified. A model with
a train and an eval graph has the same tuners removed from both.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn

from .merge_sites import (CHANNELS_FIRST, RowMap, called_once, functional_linear, linear_values,
                          output_parameters, passthrough, producer)
from .modes import ModalGraphModule
from .placements.base import FULL
from .placements.parallel import ParallelJoint
from .placements.sequential import SequentialJoint
from .placements.weight import FUNCTIONALIZED, WeightJoint, restore_weight_form
from .verify import compiled_info

__all__ = ["merge"]


def merge(model: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``model`` with every mergeable tuner folded in and removed from the graph."""
    merged = copy.deepcopy(model)
    info = compiled_info(merged)
    mergeable = {i.module_name for i in info.plan.insertions if i.mergeable}
    folded: set[str] = set()
    graphs = merged.each_graph() if isinstance(merged, ModalGraphModule) else [merged.graph]
    for index, graph in enumerate(graphs):
        restore_weight_form(merged, graph)
        joints = [n for n in graph.nodes if n.op == "call_module" and n.target in mergeable]
        for node in joints:  # a joint's keyword inputs only save memory (an affine's recomputation)
            inputs = node.kwargs.get("params", ())
            node.kwargs = {}
            for value in inputs:  # parameter reads made for the recomputation alone
                if isinstance(value, fx.Node) and value.op == "get_attr" and not value.users:
                    graph.erase_node(value)
        # output-side folds first: a sequential tuner then sees the linear after it as its only user
        joints.sort(key=lambda n: isinstance(merged.get_submodule(n.target), SequentialJoint))
        for node in joints:
            if index == 0 and node.target not in folded:  # weights fold once, on the first graph
                if _fold(merged, merged.get_submodule(node.target), node):
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
    # parameters a fold had to create (the bias of an op that had none): not in the base's state dict
    merged.meta["utdsl_merge_added"] = sorted(set(merged.state_dict()) - set(model.state_dict()))
    merged.meta["utdsl_merged"] = True
    return merged


@torch.no_grad()
def _fold(gm: fx.GraphModule, joint: nn.Module, node: fx.Node) -> bool:
    if isinstance(joint, WeightJoint):
        return _fold_weight(gm, joint, node)
    if isinstance(joint, ParallelJoint):
        return _fold_parallel(gm, joint, node)
    if isinstance(joint, SequentialJoint):
        return _fold_after(gm, joint, node) or _fold_before(gm, joint, node) or _fold_into_product(gm, joint, node)
    return False


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


def _row_maps(joint: SequentialJoint, out: int) -> list[RowMap] | None:
    """The sequential joint as affine maps of its output rows, or None if a unit is not linear."""
    maps = []
    for unit, rows in _tuned_rows(joint, out):
        if not joint.residual and hasattr(unit, "merge_delta"):
            scale, shift = unit.merge_delta()
            maps.append(RowMap(rows, scale, None, shift))
        elif joint.residual and hasattr(unit, "merge_linear") and unit.merge_linear() is not None:
            mix, shift = unit.merge_linear()
            maps.append(RowMap(rows, None, mix, shift))
        else:
            return None
    return maps


def _fold_parallel(gm: fx.GraphModule, joint: ParallelJoint, node: fx.Node) -> bool:
    """y = W x + b + U(x), U(x) = ΔW x (lowrank) or M x + c (linear adapter): W += ΔW, b += c."""
    h, x = node.args
    functional = functional_linear(gm, h)
    if functional is not None:
        weight, pieces = functional
        if linear_values(h).get("input") is not x:
            return False
    elif h.op == "call_module" and h.args[:1] == (x,) and called_once(gm, h):
        module = gm.get_submodule(h.target)
        weight = module.weight
    else:
        return False
    deltas = []
    for unit, rows in _tuned_rows(joint, weight.shape[0]):
        found = unit.merge_linear() if hasattr(unit, "merge_linear") else (unit.merge_delta(), None)
        if found is None:
            return False
        deltas.append((rows, *found))
    shifts = [(rows, shift) for rows, _, shift in deltas if shift is not None]
    if functional is not None:
        bias = torch.cat([t for t, _ in pieces]) if pieces else weight.new_zeros(weight.shape[0])
        new_bias = bias.clone()
        for rows, shift in shifts:
            new_bias[rows] += shift.to(bias.dtype)
        if not _write_bias_pieces(pieces, new_bias):
            return False
    else:
        if not _parallel_fits(module, joint):
            return False
        if shifts:
            _ensure_bias(module)
        for rows, shift in shifts:
            module.bias[rows] += shift.to(weight.dtype)
    for rows, delta, _ in deltas:
        weight[rows] += delta.reshape(weight[rows].shape).to(weight.dtype)
    return True


def _parallel_fits(module: nn.Module, joint: ParallelJoint) -> bool:
    """A linear; a Conv2d with groups=1 for a conv-shaped lowrank, or a 1x1 one for an adapter."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return False  # ΔW spans every input channel; a grouped weight cannot hold it
    unit = next(iter(joint.units.values()))
    if not hasattr(unit, "merge_linear"):
        return getattr(unit, "native_layout", False)
    pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
    return pointwise and joint.in_axis == 1 and joint.out_axis == 1


def _write_bias_pieces(pieces: list, new_bias: torch.Tensor) -> bool:
    """Write ``new_bias`` into the bias pieces of a functional linear: refused (nothing written)
    when a piece that is not a parameter would change, or there is no bias and it is not zero."""
    if not pieces:
        return not torch.count_nonzero(new_bias)
    start, updates = 0, []
    for tensor, is_parameter in pieces:
        new = new_bias[start:start + tensor.shape[0]]
        start += tensor.shape[0]
        if not torch.equal(new, tensor):
            if not is_parameter:
                return False
            updates.append((tensor, new))
    for tensor, new in updates:
        tensor.copy_(new)
    return True


def _ensure_bias(module: nn.Module) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]), requires_grad=False)


def _fold_after(gm: fx.GraphModule, joint: SequentialJoint, node: fx.Node) -> bool:
    """y = A (W x + b) + c: the op's rows become A W, A b + c (A = diag(s) or I + M, per chunk)."""
    return _fold_into_producer(gm, node.args[0], joint.out_axis, lambda out: _row_maps(joint, out))


def _fold_into_product(gm: fx.GraphModule, joint: SequentialJoint, node: fx.Node) -> bool:
    """(s ⊙ a) ⊙ b = a ⊙ (s ⊙ b): a scale (no shift) on one factor of a product of two equal-shaped
    values folds into the op producing the other (IA3 on a gated MLP's activation)."""
    if joint.residual or len(node.users) != 1:
        return False
    (user,) = node.users
    if user.op != "call_function" or user.target not in (operator.mul, torch.mul) or user.kwargs \
            or len(user.args) != 2 or user.args[0] is user.args[1]:
        return False
    other = user.args[1] if user.args[0] is node else user.args[0]
    shapes = [getattr(v.meta.get("tensor_meta"), "shape", None) if isinstance(v, fx.Node) else None
              for v in (node, other)]
    if shapes[0] is None or shapes[0] != shapes[1]:
        return False

    def maps(out: int) -> list[RowMap] | None:
        found = _row_maps(joint, out)
        return None if found is None or any(m.shift is not None for m in found) else found

    return _fold_into_producer(gm, other, joint.out_axis, maps)


def _fold_into_producer(gm: fx.GraphModule, value: fx.Node, axis: int, make_maps) -> bool:
    """Fold ``make_maps(out channels)`` into the op whose output reaches ``value`` (channel axis
    ``axis``) through nodes that only move axes."""
    found = producer(gm, value, axis)
    if found is None:
        return False
    op, axis, ndim = found
    functional = functional_linear(gm, op)
    if functional is not None:
        weight, pieces = functional
        maps = make_maps(weight.shape[0])
        if axis != ndim - 1 or maps is None:
            return False
        bias = torch.cat([t for t, _ in pieces]) if pieces else weight.new_zeros(weight.shape[0])
        new_bias = bias.clone()
        for m in maps:
            new_bias[m.rows] = m.apply_bias(bias[m.rows])
        if not _write_bias_pieces(pieces, new_bias):
            return False
        for m in maps:
            weight[m.rows] = m.apply(weight[m.rows])
        return True
    params = output_parameters(gm, op)
    if params is None:
        return False
    weight, bias, owner, channels_first = params
    maps = make_maps(weight.shape[0])
    if maps is None or axis != (1 if channels_first else ndim - 1):
        return False
    if any(m.mix is not None for m in maps):  # mixing channels needs a full, ungrouped weight
        if not isinstance(owner, (nn.Linear, *CHANNELS_FIRST)) or getattr(owner, "groups", 1) != 1:
            return False
    if bias is None:
        if owner is None:
            return False
        _ensure_bias(owner)
        bias = owner.bias
    for m in maps:
        weight[m.rows] = m.apply(weight[m.rows])
        bias[m.rows] = m.apply_bias(bias[m.rows])
    return True


def _fold_before(gm: fx.GraphModule, joint: SequentialJoint, node: fx.Node) -> bool:
    """y = W (A a + c) + b = (W A) a + (W c + b), for a tuner whose only user is a linear (or a 1x1
    conv without padding or groups, on channels-first values)."""
    if joint.chunk_indices is not None:
        return False
    value = node
    while len(value.users) == 1 and passthrough(gm, next(iter(value.users))):
        value = next(iter(value.users))
    if len(value.users) != 1:
        return False
    (user,) = value.users
    if user.op != "call_module" or user.args != (value,) or user.kwargs or not called_once(gm, user):
        return False
    module = gm.get_submodule(user.target)
    if isinstance(module, nn.Linear):
        fits = joint.out_axis == -1
    else:
        fits = joint.out_axis == 1 and isinstance(module, CHANNELS_FIRST) and module.groups == 1 \
            and set(module.kernel_size) == {1} and set(module.padding) == {0}
    maps = _row_maps(joint, module.weight.shape[1]) if fits else None
    if maps is None:
        return False
    (m,) = maps
    weight = module.weight.view(module.weight.shape[0], -1)  # a 1x1 conv's weight is (out, in, 1, 1)
    if m.shift is not None:
        _ensure_bias(module)
        module.bias += weight @ m.shift.to(weight.dtype)
    weight.copy_(m.right(weight))
    return True

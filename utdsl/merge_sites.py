"""What :mod:`utdsl.merge` reads off the graph to fold a tuner: the op whose output reaches it
(seeing through nodes that only move axes), that op's weight and bias, functional linears and
their bias pieces, and the affine map a tuner is of its channels.

Nothing here edits a graph; every function answers None (or False) where a fold would not be exact
or would change another use of a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["CHANNELS_FIRST", "RowMap", "called_once", "functional_linear", "linear_values",
           "output_parameters", "passthrough", "producer"]

CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d)
#: batch norms with nothing after the affine (timm's BatchNormAct2d also activates: not these)
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class RowMap:
    """y = s ⊙ h + M h + t on the channels ``rows`` of h (an absent term is left out): an affine is
    (s, -, t), a residual linear adapter (-, M, c) (y = h + M h + c)."""

    rows: slice
    scale: torch.Tensor | None
    mix: torch.Tensor | None
    shift: torch.Tensor | None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part on the rows of ``x`` (k, ...): s ⊙ x + M x."""
        flat = x.reshape(x.shape[0], -1)
        out = flat * self.scale.to(x.dtype)[:, None] if self.scale is not None else flat
        if self.mix is not None:
            out = out + self.mix.to(x.dtype) @ flat
        return out.reshape(x.shape)

    def apply_bias(self, b: torch.Tensor) -> torch.Tensor:
        out = self.apply(b)
        return out + self.shift.to(b.dtype) if self.shift is not None else out

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """W A for a weight reading the map's output: W diag(s) + W M."""
        out = w * self.scale.to(w.dtype) if self.scale is not None else w
        return out + w @ self.mix.to(w.dtype) if self.mix is not None else out


def passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An identity in train and eval mode: an Identity, or a Dropout with p = 0."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0.0)


def _ndim(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _ints(values) -> list[int] | None:
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    return list(values) if all(isinstance(v, int) for v in values) else None


_LAYOUT_FUNCTIONS = {torch.transpose: "transpose", torch.permute: "permute", torch.flatten: "flatten"}


def _step_back(gm: fx.GraphModule, node: fx.Node, axis: int) -> tuple[fx.Node, int] | None:
    """(input, the input's axis that becomes ``axis`` of ``node``) for a node that only moves axes
    or does nothing; None for any other node."""
    if passthrough(gm, node):
        return node.args[0], axis
    name = node.target if node.op == "call_method" else \
        _LAYOUT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if name not in ("contiguous", "transpose", "permute", "flatten") or not node.args:
        return None
    source, rest = node.args[0], node.args[1:]
    n = _ndim(source)
    if n is None or (node.kwargs and name != "flatten"):
        return None
    if name == "contiguous":
        return (source, axis) if not rest else None
    if name == "transpose":
        dims = _ints(rest)
        if dims is None or len(dims) != 2:
            return None
        a, b = (d % n for d in dims)
        return source, b if axis == a else a if axis == b else axis
    if name == "permute":
        dims = _ints(rest)
        return (source, dims[axis] % n) if dims is not None and len(dims) == n else None
    values = dict(zip(("start_dim", "end_dim"), rest)) | dict(node.kwargs)
    start, end = values.get("start_dim", 0), values.get("end_dim", -1)
    if not (isinstance(start, int) and isinstance(end, int)):
        return None
    start, end = start % n, end % n
    if axis < start or (axis == start and end == start):
        return source, axis
    return (source, axis + end - start) if axis > start else None


def producer(gm: fx.GraphModule, value: fx.Node, axis: int) -> tuple[fx.Node, int, int] | None:
    """(op, the channel axis of its output, its output's ndim) for the op whose output reaches
    ``value`` only through :func:`_step_back` nodes, ``value``'s channel axis being ``axis``; each
    value on the way, ``value`` included, must have one user (the fold changes all of them)."""
    ndim = _ndim(value)
    if ndim is None or len(value.users) != 1:
        return None
    axis %= ndim
    while (step := _step_back(gm, value, axis)) is not None:
        value, axis = step
        ndim = _ndim(value)
        if ndim is None or len(value.users) != 1:
            return None
    return value, axis, ndim


def _reads(graph: fx.Graph, target: str) -> int:
    """How many uses read the parameter or module ``target`` (or anything under it)."""
    count = 0
    for node in graph.nodes:
        if node.op == "get_attr" and (node.target == target or node.target.startswith(target + ".")):
            count += len(node.users)
        elif node.op == "call_module" and node.target == target:
            count += 1
    return count


def called_once(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s module is the only use of that module and its parameters."""
    return node.op == "call_module" and _reads(node.graph, node.target) == 1


def linear_values(h: fx.Node) -> dict:
    return dict(zip(("input", "weight", "bias"), h.args)) | dict(h.kwargs)


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def functional_linear(gm: fx.GraphModule, h: fx.Node):
    """(weight, bias pieces) of ``F.linear(x, weight, bias)`` whose weight is a parameter read by
    this call alone (a module used functionally, e.g. timm's EVA/BEiT/SwinV2 ``qkv``), else None.
    The bias pieces are ``[(tensor, is_parameter)]`` in output order: a parameter or buffer, or the
    ``torch.cat`` of some (``q_bias``, the ``k_bias`` zeros, ``v_bias``); None for a bias built
    otherwise, ``[]`` for no bias."""
    if h.op != "call_function" or h.target is not F.linear:
        return None
    values = linear_values(h)
    weight, bias = values.get("weight"), values.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if _reads(h.graph, weight.target) != 1:
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
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" and _reads(h.graph, p.target) == 1 for p in parts):
        return None
    pieces = []
    for part in parts:
        is_parameter = _is_parameter(gm, part.target)
        pieces.append((gm.get_parameter(part.target) if is_parameter else gm.get_buffer(part.target), is_parameter))
    return gm.get_parameter(weight.target), pieces


def output_parameters(gm: fx.GraphModule, h: fx.Node):
    """(weight, bias, owner, channels_first) of the op that produced ``h`` when a map of its output
    channels can fold into it: a linear, conv, layer norm over one axis or plain batch norm module
    called once, or ``F.layer_norm`` with parameters read there alone. ``owner`` is the module
    (None for a functional call), ``bias`` may be None for a module (one is then made)."""
    if h.op == "call_module":
        if not called_once(gm, h):
            return None
        module = gm.get_submodule(h.target)
        if isinstance(module, nn.LayerNorm):
            ok = module.elementwise_affine and module.weight.dim() == 1 and module.bias is not None
            return (module.weight, module.bias, module, False) if ok else None
        if isinstance(module, nn.Linear):
            return module.weight, module.bias, module, False
        if isinstance(module, CHANNELS_FIRST) or (type(module) in _PLAIN_BATCH_NORMS and module.affine):
            return module.weight, module.bias, module, True  # BN: s (g x^ + b) + t, batch or running x^
        return None
    if h.op == "call_function" and h.target is F.layer_norm:
        values = dict(zip(("input", "normalized_shape", "weight", "bias"), h.args)) | dict(h.kwargs)
        weight, bias = values.get("weight"), values.get("bias")
        if all(isinstance(v, fx.Node) and v.op == "get_attr" and _reads(h.graph, v.target) == 1
               for v in (weight, bias)):
            weight, bias = gm.get_parameter(weight.target), gm.get_parameter(bias.target)
            return (weight, bias, None, False) if weight.dim() == 1 else None
    return None

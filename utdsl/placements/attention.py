"""Finding the attention computations inside a traced region, for placements that edit K and V.

Input: a :class:`~utdsl.trace.Region` of a shape-propagated graph. Output: one
:class:`AttentionCall` per attention found, saying which node argument holds the keys, the values
and any mask, so a placement can extend them. Two forms are recognised:

- ``fused``: a call of ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)``
  (timm's default); keys are ``k`` (B, H, S, D), values ``v``.
- ``manual``: ``softmax(f(a @ b), dim=-1) -> dropout -> @ v`` (timm with ``fused_attn=False``, most
  hand-written attentions): keys are the scores product's right operand, k transposed (B, H, D, S);
  every other value that joins the scores between the product and the softmax (a mask, a
  relative-position bias; None at run time is fine) is a mask whose last axis runs over the keys.
  The softmax may be ``torch.softmax``, ``Tensor.softmax`` or an ``nn.Softmax(dim=-1)`` module; the
  nodes between the product and the softmax (scaling, bias, views) are kept as ``path``.

Invariants: nothing is edited here; locations are (node, positional index or keyword name) so an
edit replaces exactly that argument (q and k may be the same node).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..trace import Region

__all__ = ["ArgRef", "Mask", "AttentionCall", "find_attention"]

_SDPA = (F.scaled_dot_product_attention,)
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
_MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax)
_PASS_THROUGH_METHODS = ("to", "float", "type_as", "half", "bfloat16", "contiguous")


@dataclass(frozen=True)
class ArgRef:
    """Argument ``key`` (a positional index or a keyword name) of ``node``."""

    node: fx.Node
    key: Union[int, str]

    def get(self, default=None):
        if isinstance(self.key, int):
            return self.node.args[self.key] if self.key < len(self.node.args) else default
        return self.node.kwargs.get(self.key, default)

    def set(self, value) -> None:
        if isinstance(self.key, int):
            self.node.update_arg(self.key, value)
        else:
            self.node.update_kwarg(self.key, value)


@dataclass(frozen=True)
class Mask:
    """A mask or bias over the keys, read at ``where``; ``visible`` is the boolean value that lets
    a query see a key (True for sdpa and ``where``, False for ``masked_fill``)."""

    where: ArgRef
    visible: bool = True


@dataclass
class AttentionCall:
    kind: str                       # "fused" or "manual"
    node: fx.Node                   # the sdpa call, or the softmax
    query: fx.Node
    keys: ArgRef                    # where the keys are read
    key_axis: int                   # axis of the keys' sequence in that value: -2 (k) or -1 (k transposed)
    values: ArgRef
    num_heads: int
    head_dim: int
    masks: list[Mask] = field(default_factory=list)     # what joins the scores over the keys
    is_causal: ArgRef | None = None                      # fused only
    path: list[fx.Node] = field(default_factory=list)    # manual only: scores product -> softmax


def find_attention(found: Region, modules: dict[str, nn.Module]) -> list[AttentionCall]:
    """Every attention of ``found``, in graph order."""
    calls = []
    for node in found.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            calls.append(_fused(node))
        elif _is_softmax(node, modules):
            call = _manual(node, modules)
            if call is not None:
                calls.append(call)
    return calls


def _fused(node: fx.Node) -> AttentionCall:
    def ref(index: int, name: str) -> ArgRef:
        return ArgRef(node, index if index < len(node.args) else name)

    query, keys, values = ref(0, "query"), ref(1, "key"), ref(2, "value")
    heads, dim = _heads(values.get())
    mask = ref(3, "attn_mask")
    return AttentionCall("fused", node, query.get(), keys, -2, values, heads, dim, [Mask(mask)],
                         ref(5, "is_causal"))


def _manual(softmax: fx.Node, modules: dict[str, nn.Module]) -> AttentionCall | None:
    scores, masks, path = _scores_product(softmax)
    value_product = _value_product(softmax, modules)
    if scores is None or value_product is None:
        return None
    heads, dim = _heads(value_product.args[1])
    return AttentionCall("manual", softmax, scores.args[0], ArgRef(scores, 1), -1,
                         ArgRef(value_product, 1), heads, dim, masks, path=path)


def _heads(values) -> tuple[int, int]:
    """(H, D) of values shaped (B, H, S, D); (0, 0) otherwise, which the placement reports."""
    shape = _shape(values) if isinstance(values, fx.Node) else None
    return (shape[1], shape[3]) if shape is not None and len(shape) == 4 else (0, 0)


def _is_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A softmax over the last axis."""
    if node.op == "call_module" and isinstance(modules.get(node.target), nn.Softmax):
        dim = modules[node.target].dim
        return dim == -1 or (isinstance(dim, int) and dim > 0 and dim == _ndim(node) - 1)
    if not ((node.op == "call_method" and node.target == "softmax")
            or (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS)):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim == -1 or (isinstance(dim, int) and dim > 0 and dim == _ndim(node) - 1)


def _ndim(node: fx.Node) -> int:
    return len(getattr(node.meta.get("tensor_meta"), "shape", ()))


def _is_matmul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in _MATMUL_METHODS))


def _scores_product(softmax: fx.Node) -> tuple[fx.Node | None, list[Mask], list[fx.Node]]:
    """The ``a @ b`` whose result the softmax normalises, the masks joined on the way, and the
    nodes on the way (softmax's input first)."""
    node, masks, path = softmax.args[0], [], []
    while isinstance(node, fx.Node) and not _is_matmul(node):
        tensors = [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node) and _shape(a) is not None]
        if not tensors or node.op not in ("call_function", "call_method"):
            return None, [], []
        # the scores are the operand shaped like the result (a bias may broadcast to it)
        on_path = next(((i, a) for i, a in tensors if _shape(a) == _shape(node)), tensors[0])
        visible = not (node.op == "call_method" and node.target == "masked_fill")
        masks += [Mask(ArgRef(node, i), visible) for i, _ in tensors if i != on_path[0]]
        path.append(node)
        node = on_path[1]
    return (node if isinstance(node, fx.Node) else None), masks, path


def _value_product(softmax: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The ``weights @ v`` that reads the softmax (through dropout and dtype casts)."""
    node = softmax
    for _ in range(4):
        users = list(node.users)
        if len(users) != 1:
            return None
        previous, (node,) = node, users
        if _is_matmul(node):
            return node if node.args[0] is previous and len(node.args) > 1 else None
        passing = ((node.op == "call_module" and isinstance(modules.get(node.target), nn.Dropout))
                   or (node.op == "call_function" and node.target is F.dropout)
                   or (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS))
        if not passing:
            return None
    return None


def _shape(node: fx.Node):
    return getattr(node.meta.get("tensor_meta"), "shape", None)

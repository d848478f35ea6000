"""The ``prefix`` placement: learned keys and values joined to K and V inside a region's attention.

Input: a site whose region holds exactly one attention
(:func:`utdsl.placements.attention.find_attention`: a fused ``scaled_dot_product_attention`` call or
a manual ``softmax(q @ k^T) @ v``) with keys and values (B, H, S, D). Output: the attention reads [Pk; K] and [Pv; V], the tuner's L keys and values
split into H heads of D and expanded to the batch; every mask over the keys gains L leading
entries that let each query see the prefix, and ``is_causal`` becomes the equivalent explicit mask.

What it computes: Attn(Q, [Pk; K], [Pv; V]) = (1 - l) Attn(Q, K, V) + l Attn(Q, Pk, Pv) with
l(q) = sum_i exp(q.Pk_i s) / (sum_i exp(q.Pk_i s) + sum_j exp(q.K_j s)), s the attention's scale:
prefix tuning is a gated parallel tuner on the attention (He et al., 2022). It is never the
identity at init (l > 0 whatever Pk and Pv are).

Relative-position biases, window masks and attention biases over the keys (BEiT, Swin, LeViT) give
the prefix keys 0 bias; the prefix joins K after any rotary embedding (EVA-02, RoPE ViTs), so it is
not rotated; a view of the scores that keeps the key axis (Swin's shifted-window mask) reads the
new key count. Every site is first tried on a copy of the graph (:func:`utdsl.placements.probing.probe`): a
region where the prefixed attention does not run is refused at compile time.

Invariants: nodes outside the attention are untouched; the region's boundary is unchanged; the
inserted nodes carry the site's module stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from ..resolve import Binding
from ..trace import Region, stack_up_to
from ..tuners import SiteInfo
from .attention import AttentionCall, find_attention
from .base import FULL, ModuleTable, Placement, SiteError, build_units, shared_module
from .probing import describe_node, probe

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Prefix", "PrefixJoint", "prefix_mask", "last_size"]


class PrefixJoint(nn.Module):
    """Joins the unit's keys (or values), split into heads, in front of an attention's own."""

    def __init__(self, units: dict[str, nn.Module], num_heads: int, head_dim: int):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.num_heads = num_heads
        self.head_dim = head_dim

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    def heads(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values as (batch, H, L, D)."""
        def split(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(t.shape[0], self.num_heads, self.head_dim).transpose(0, 1)
            return t.unsqueeze(0).expand(batch, -1, -1, -1)

        keys, values = self.units[FULL]()
        return split(keys), split(values)

    def forward(self, x: torch.Tensor, part: str, axis: int = -2) -> torch.Tensor:
        """``x`` with the prefix ``part`` ("keys" or "values") in front along the token ``axis``
        (-2 for (B, H, S, D); -1 for keys already transposed to (B, H, D, S))."""
        keys, values = self.heads(x.shape[0])
        prefix = keys if part == "keys" else values
        if axis == -1:
            prefix = prefix.transpose(-2, -1)
        return torch.cat([prefix.to(x.dtype), x], dim=axis)


def prefix_mask(mask, length: int, visible: bool = True, is_causal=False, query=None, keys=None):
    """``mask`` over S keys extended to the L + S keys of a prefixed attention: L leading entries
    that let every query see the prefix (0 for additive masks, ``visible`` for boolean ones). With
    ``is_causal``, the causal mask of ``query`` over ``keys`` (S of them) is built first. Values
    that are not masks over the keys (None, numbers, tensors broadcast over the keys) pass."""
    if is_causal:
        if mask is not None:
            raise ValueError("attn_mask and is_causal cannot both be set")
        mask = torch.ones(query.shape[-2], keys.shape[-2], dtype=torch.bool, device=query.device).tril()
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0 or mask.shape[-1] == 1:
        return mask
    fill = visible if mask.dtype == torch.bool else 0
    pad = mask.new_full((*mask.shape[:-1], length), fill)
    return torch.cat([pad, mask], dim=-1)


_RESHAPES = ("view", "reshape")


def last_size(x: torch.Tensor) -> int:
    """``x``'s last size: what a view of the scores that keeps the key axis asks for."""
    return x.shape[-1]


def _scores_views(call: AttentionCall) -> list[fx.Node]:
    """The views and reshapes of the scores before the softmax; each must keep the key axis."""
    views = []
    for node in call.path:
        if node.op == "call_method" and node.target in _RESHAPES:
            before, after = _shape(node.args[0]), _shape(node)
            if before is None or after is None or before[-1] != after[-1]:
                raise SiteError(f"the attention scores are reshaped across the key axis at "
                                 f"{describe_node(node)}; prefix keys cannot be joined")
            views.append(node)
    return views


def _shape(node) -> tuple | None:
    shape = getattr(getattr(node, "meta", {}).get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def _attention(found: Region, gm: fx.GraphModule) -> AttentionCall:
    calls = find_attention(found, ModuleTable(gm))
    if not calls:
        raise SiteError("prefix needs an attention inside the region; found neither a "
                         "scaled_dot_product_attention call nor softmax(q @ k) @ v",
                         "select attention modules, e.g. blocks.*.attn")
    if len(calls) > 1:
        raise SiteError(f"this region holds {len(calls)} attentions; prefix joins the keys of one",
                         "select each attention (or each block), e.g. blocks.*.attn")
    call = calls[0]
    if not call.num_heads:
        raise SiteError("the attention's values are not (batch, heads, tokens, head_dim)")
    keys = _shape(call.keys.get())
    key_dim = keys[-1 if call.key_axis == -2 else -2] if keys is not None and len(keys) == 4 else None
    if key_dim != call.head_dim:
        raise SiteError(f"the attention's keys have {key_dim} channels a head and its values "
                         f"{call.head_dim}; the kv tuner gives keys and values of one width")
    return call


class Prefix(Placement):
    name = "prefix"
    summary = "learned keys/values joined to K and V inside the region's attention"

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        if binding.chunks is not None:
            raise SiteError("prefix keys and values join a whole attention; chunks do not apply")
        call = _attention(found, gm)
        _scores_views(call)
        width = call.num_heads * call.head_dim
        _try(gm, binding, call.num_heads, call.head_dim)
        extras = {"num_heads": call.num_heads, "head_dim": call.head_dim, "attention": call.kind}
        return SiteInfo(binding.path, width, width, extras), -1, -1

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        call = _attention(found, gm)
        joint = shared_module(gm, insertion.module_name, lambda: PrefixJoint(
            build_units(gm, insertion), call.num_heads, call.head_dim))
        gm.add_submodule(insertion.module_name, joint)
        _edit(gm.graph, call, insertion.module_name, insertion.args.length, insertion.site)


class _ZeroKV(nn.Module):
    def __init__(self, length: int, width: int):
        super().__init__()
        self.length, self.width = length, width

    def forward(self):
        zeros = torch.zeros(self.length, self.width, device="meta")
        return zeros, zeros


def _try(gm: fx.GraphModule, binding: Binding, heads: int, dim: int) -> None:
    """Refuse a site whose attention does not run with prefix keys and values joined."""
    length = binding.rule.args.length
    target = "utdsl_probe_prefix"
    modules = ModuleTable(gm)

    def edit(graph: fx.Graph, found: Region) -> dict:
        (call,) = find_attention(found, modules)
        _edit(graph, call, target, length, binding.path)
        return {target: PrefixJoint({FULL: _ZeroKV(length, heads * dim)}, heads, dim)}

    tried = probe(gm, binding.path, edit)
    if tried.failed is not None:
        first = str(tried.error).strip().split("\n")[0]
        raise SiteError(f"the attention does not run with prefix keys joined: {describe_node(tried.failed)} "
                         f"fails ({first})",
                         "prefix needs keys and values (batch, heads, tokens, head_dim) that the scores "
                         "product reads unchanged")


def _edit(graph: fx.Graph, call: AttentionCall, target: str, length: int, site: str) -> None:
    """Join the keys and values of ``target`` (a :class:`PrefixJoint`) to ``call``'s own."""
    stack = stack_up_to(call.node, site)

    def before(node: fx.Node, op: str, target, args: tuple) -> fx.Node:
        with graph.inserting_before(node):
            new = graph.create_node(op, target, args)
        new.meta["nn_module_stack"] = dict(stack)
        return new

    keys = call.keys.get()
    call.keys.set(before(call.keys.node, "call_module", target, (keys, "keys", call.key_axis)))
    call.values.set(before(call.values.node, "call_module", target, (call.values.get(), "values", -2)))
    for view in _scores_views(call):
        scores = view.args[0]
        size = before(view, "call_function", last_size, (scores,))
        if len(view.args) == 2 and isinstance(view.args[1], (tuple, list)):
            view.update_arg(1, (*view.args[1][:-1], size))
        else:
            view.update_arg(len(view.args) - 1, size)
    for mask in call.masks:
        value = mask.where.get()
        causal = call.is_causal.get(False) if call.is_causal is not None else False
        if not isinstance(value, fx.Node) and not (causal is True or isinstance(causal, fx.Node)):
            continue
        args: tuple = (value, length, mask.visible)
        if call.is_causal is not None:
            args += (causal, call.query, keys)
            call.is_causal.set(False)
        mask.where.set(before(mask.where.node, "call_function", prefix_mask, args))


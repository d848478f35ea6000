"""The ``prefix`` placement: learned keys and values joined to K and V inside a region's attention.

Input: a site whose region holds exactly one attention (:func:`utdsl.attention.find_attention`:
a fused ``scaled_dot_product_attention`` call or a manual ``softmax(q @ k^T) @ v``) with keys and
values (B, H, S, D). Output: the attention reads [Pk; K] and [Pv; V], the tuner's L keys and values
split into H heads of D and expanded to the batch; every mask over the keys gains L leading
entries that let each query see the prefix, and ``is_causal`` becomes the equivalent explicit mask.

What it computes: Attn(Q, [Pk; K], [Pv; V]) = (1 - l) Attn(Q, K, V) + l Attn(Q, Pk, Pv) with
l(q) = sum_i exp(q.Pk_i s) / (sum_i exp(q.Pk_i s) + sum_j exp(q.K_j s)), s the attention's scale:
prefix tuning is a gated parallel tuner on the attention (He et al., 2022). It is never the
identity at init (l > 0 whatever Pk and Pv are).

Invariants: nodes outside the attention are untouched; the region's boundary is unchanged; the
inserted nodes carry the site's module stack.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .attention import AttentionCall, find_attention
from .joints import FULL
from .plan import SITE_ANALYZERS, Insertion, SiteError
from .resolve import Binding
from .rewrite import INSERTERS, build_units, shared_module
from .trace import Region, stack_up_to
from .tuners import SiteInfo

__all__ = ["PrefixJoint", "prefix_mask", "analyze_prefix", "insert_prefix"]


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


def _attention(found: Region, gm: fx.GraphModule) -> AttentionCall:
    calls = find_attention(found, dict(gm.named_modules()))
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
    return call


def analyze_prefix(binding: Binding, found: Region, module, gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
    if binding.rule.selector.chunks is not None:
        raise SiteError("prefix keys and values join a whole attention; chunks do not apply")
    call = _attention(found, gm)
    width = call.num_heads * call.head_dim
    extras = {"num_heads": call.num_heads, "head_dim": call.head_dim, "attention": call.kind}
    return SiteInfo(binding.path, width, width, extras), -1, -1


def insert_prefix(gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
    call = _attention(found, gm)
    joint = shared_module(gm, insertion.module_name, lambda: PrefixJoint(
        build_units(gm, insertion), call.num_heads, call.head_dim))
    gm.add_submodule(insertion.module_name, joint)
    length = insertion.args.length
    stack = stack_up_to(call.node, insertion.site)

    def before(node: fx.Node, op: str, target, args: tuple) -> fx.Node:
        with gm.graph.inserting_before(node):
            new = gm.graph.create_node(op, target, args)
        new.meta["nn_module_stack"] = dict(stack)
        return new

    keys = call.keys.get()
    call.keys.set(before(call.keys.node, "call_module", insertion.module_name, (keys, "keys", call.key_axis)))
    call.values.set(before(call.values.node, "call_module", insertion.module_name,
                           (call.values.get(), "values", -2)))
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


SITE_ANALYZERS["prefix"] = analyze_prefix
INSERTERS["prefix"] = insert_prefix

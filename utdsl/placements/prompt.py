"""The ``prompt`` placement: learned tokens joined to a region's input, removed at its output.

Input: a site whose region takes one token sequence x (B, N, C) and gives one y (B, N', C).
Output: the graph computes x' = [x[:, :n], P, x[:, n:]] right before the region's first use of x,
every use of x inside the region reads x', and every use of y outside reads
y' = [y[:, :n], y[:, n + L:]], where n is the model's prefix-token count (timm's
``num_prefix_tokens``: class, distillation and register tokens; 0 when the model has none) and P
the tuner's L tokens. Selecting the ``blocks`` stack gives VPT-shallow, each ``blocks.*`` VPT-deep
(each block's prompts replace the previous block's, as VPT does).

Inside the region the prompts are tokens like the others, with two exceptions that keep the base
model's own tokens computing what they did: a relative-position bias (or mask) over the region's
N tokens that joins an attention's scores (BEiT, LeViT, Swin windows) gets zero rows and columns for
the prompts, and a slice at the prefix-token boundary (EVA-02's and RoPE ViTs' rotary embedding,
applied to the tokens after the prefix tokens) moves past the prompts, so prompts are not rotated.
Every site is first tried on a copy of the graph with N + L tokens (:func:`utdsl.placements.probing.probe`); a
region where that fails (tokens reshaped to a spatial grid, as in PVT-v2; a position tensor sized for
N tokens) is refused at compile time with the reason.

Invariants: the region's boundary is unchanged, so whatever reads y (the final norm, cls or avg
pooling, the head, another rule's joint) sees exactly the tokens it saw before; the inserted nodes
carry the site's module stack, so later rules on the same site wrap them. Tensor metadata inside a
prompted region keeps the traced token count (it is only used for sizes planned beforehand).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from ..backends import fixed_token_count
from ..resolve import Binding
from ..trace import Region, stack_up_to
from ..tuners import SiteInfo
from .attention import ArgRef, find_attention
from .base import FULL, ModuleTable, Placement, SiteError, build_units, shared_module
from .prefix import prefix_mask
from .probing import depends_on, describe_node, probe

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Prompt", "PromptJoint", "drop_tokens", "pad_tokens"]


class PromptJoint(nn.Module):
    """x (B, N, C) -> (B, N + L, C) with the unit's L tokens placed after the first ``start``."""

    def __init__(self, units: dict[str, nn.Module], start: int):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.start = start

    def extra_repr(self) -> str:
        return f"start={self.start}"

    @property
    def length(self) -> int:
        return self.units[FULL].length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompts = self.units[FULL](x).to(x.dtype)
        return torch.cat([x[:, :self.start], prompts, x[:, self.start:]], dim=1)


def drop_tokens(y: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """``y`` without the ``length`` tokens that follow its first ``start``."""
    return torch.cat([y[:, :start], y[:, start + length:]], dim=1)


def pad_tokens(bias: torch.Tensor, start: int, length: int, axes: tuple[int, ...]) -> torch.Tensor:
    """``bias`` with ``length`` entries inserted after the first ``start`` along each of ``axes``:
    0 for an additive bias, True (visible) for a boolean mask."""
    fill = True if bias.dtype == torch.bool else 0
    for axis in axes:
        shape = list(bias.shape)
        shape[axis] = length
        pad = bias.new_full(shape, fill)
        bias = torch.cat([bias.narrow(axis, 0, start), pad,
                          bias.narrow(axis, start, bias.shape[axis] - start)], dim=axis)
    return bias


class Prompt(Placement):
    name = "prompt"
    summary = "tokens joined to the region's input, removed at its output"

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        if binding.chunks is not None:
            raise SiteError("prompt tokens join a whole token sequence; chunks do not apply")
        if fixed_token_count(gm):
            raise SiteError("prompt adds tokens, but this model was traced by torch.export, which fixes "
                             "the token count (Hugging Face models, and models torch.fx cannot trace "
                             "into at the selected sites)",
                             "use prefix, parallel or sequential tuners on this model")
        x, y = _boundary(found)
        in_shape, out_shape = _tokens_shape(x, "input"), _tokens_shape(y, "output")
        if in_shape[2] != out_shape[2]:
            raise SiteError(f"prompt needs a region that keeps the width; it maps {in_shape[2]} to "
                             f"{out_shape[2]} channels")
        start = int(getattr(gm, "num_prefix_tokens", 0) or 0)
        if start > min(in_shape[1], out_shape[1]):
            raise SiteError(f"the model's {start} prefix tokens do not fit a sequence of {in_shape[1]}")
        _try(gm, binding, start, binding.rule.args.length, in_shape[1], out_shape[1])
        extras = {"num_prefix_tokens": start, "tokens": in_shape[1], "in_shape": in_shape,
                  "out_shape": out_shape, "patch_fan_in": _patch_fan_in(gm)}
        return SiteInfo(binding.path, in_shape[2], out_shape[2], extras), -1, -1

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        start = insertion.info.extras["num_prefix_tokens"]
        joint = shared_module(gm, insertion.module_name, lambda: PromptJoint(build_units(gm, insertion), start))
        gm.add_submodule(insertion.module_name, joint)
        _edit(gm.graph, found, start, joint.length, insertion.module_name, insertion.site, ModuleTable(gm))


_RESHAPES = ("view", "reshape", "flatten", "unflatten", "reshape_as", "view_as")


def _try(gm: fx.GraphModule, binding: Binding, start: int, length: int, tokens: int, out_tokens: int) -> None:
    """Refuse a region that does not run with ``length`` more tokens, or does not pass them on."""
    target = "utdsl_probe_prompt"
    modules = ModuleTable(gm)
    moved: list = []

    def edit(graph: fx.Graph, found: Region) -> dict:
        moved.extend(_edit(graph, found, start, length, target, binding.path, modules))
        return {target: lambda x: torch.cat([x[:, :start], x.new_zeros(x.shape[0], length, x.shape[2]),
                                             x[:, start:]], dim=1)}

    tried = probe(gm, binding.path, edit)
    if tried.failed is not None:
        node = tried.failed
        reshaped = ((node.op == "call_method" and node.target in _RESHAPES)
                    or (node.op == "call_function" and node.target in (torch.reshape, torch.flatten)))
        why = ("the tokens are reshaped to a fixed size (a spatial grid) inside this region"
               if reshaped else
               f"a tensor sized for the region's {tokens} tokens that is not computed from them "
               f"(a position embedding or bias, a rotary embedding) meets them")
        first = str(tried.error).strip().split("\n")[0]
        raise SiteError(f"prompt tokens do not fit this region: {why}, at {describe_node(node)} ({first})",
                         "select modules that treat tokens as a sequence (e.g. a ViT's blocks), "
                         "or use prefix on the attention instead")
    (y,) = tried.region.outputs
    shape = tried.shape(y)
    if shape is None or shape[1] != out_tokens + length:
        raise SiteError(f"prompt tokens do not reach this region's output: it gives {shape} with "
                         f"{length} prompts in, not {out_tokens + length} tokens")
    for node, axis in moved:
        size = tried.shape(node.args[0])
        if size is None or size[axis] != tokens + length:
            raise SiteError(f"cannot tell whether {describe_node(node)} slices the tokens")


def _boundary(found: Region) -> tuple[fx.Node, fx.Node]:
    inputs = found.tensor_inputs
    if len(inputs) != 1:
        names = ", ".join(n.name for n in inputs) or "none"
        raise SiteError(f"prompt needs a region with one token-sequence input, this one takes "
                         f"{len(inputs)} ({names})")
    if len(found.outputs) != 1:
        raise SiteError(f"prompt needs a region with one output, this one gives {len(found.outputs)}")
    return inputs[0], found.outputs[0]


def _tokens_shape(node: fx.Node, what: str) -> tuple[int, int, int]:
    meta = node.meta.get("tensor_meta")
    shape = tuple(getattr(meta, "shape", ()))
    if len(shape) != 3:
        raise SiteError(f"prompt needs a token sequence (batch, tokens, channels); this region's "
                         f"{what} is {shape or 'not a tensor'}",
                         "select a transformer stack or block, e.g. ^blocks or blocks.*")
    return shape  # type: ignore[return-value]


def _patch_fan_in(gm: nn.Module) -> int | None:
    """Inputs per output of the patch embedding's projection (VPT's init uses it)."""
    proj = getattr(getattr(gm, "patch_embed", None), "proj", None)
    weight = getattr(proj, "weight", None)
    return int(weight[0].numel()) if weight is not None and weight.dim() > 1 else None


def _edit(graph: fx.Graph, found: Region, start: int, length: int, target: str, site: str,
          modules: dict) -> list[tuple[fx.Node, int]]:
    """Join the prompts of ``target`` to the region's tokens and drop them at its output; pad the
    attentions' token biases and move prefix-token slices. Returns the moved slices (node, axis)."""
    (x,) = found.tensor_inputs
    (y,) = found.outputs
    inside = set(found.nodes)
    tokens = _tokens_shape(x, "input")[1]
    from_tokens = depends_on(found, x)
    _pad_biases(graph, found, start, length, tokens, from_tokens, modules, site)
    moved = _move_slices(found, start, length, tokens, from_tokens)
    first_use = next(n for n in found.nodes if x in n.all_input_nodes)
    with graph.inserting_before(first_use):
        joined = graph.call_module(target, (x,))
    _stamp(joined, found.first, site, x, length)
    for user in [u for u in x.users if u in inside]:
        user.replace_input_with(x, joined)

    outside_users = [u for u in y.users if u not in inside]
    with graph.inserting_after(y):
        dropped = graph.call_function(drop_tokens, (y, start, length))
    _stamp(dropped, y, site, y, 0)
    for user in outside_users:
        user.replace_input_with(y, dropped)
    return moved


def _pad_biases(graph: fx.Graph, found: Region, start: int, length: int, tokens: int,
                from_tokens: set, modules: dict, site: str) -> None:
    """Zero bias for the prompts in every bias over the tokens that joins an attention's scores
    and is not computed from the tokens (a relative-position bias, an attention bias, a mask)."""
    for call in find_attention(found, modules):
        queries, keys = _size(call.query, -2), _size(call.keys.get(), call.key_axis)
        for mask in call.masks:
            where = mask.where
            while isinstance(where.get(), fx.Node) and where.get().target is prefix_mask:
                where = ArgRef(where.get(), 0)        # a prefix placed first: pad what it pads
            value = where.get()
            shape = _size(value, None)
            if not isinstance(value, fx.Node) or value in from_tokens or not shape:
                continue
            axes = tuple(axis for axis, count in ((-2, queries), (-1, keys))
                         if len(shape) >= -axis and count == tokens and shape[axis] == tokens)
            if axes:
                with graph.inserting_before(where.node):
                    padded = graph.call_function(pad_tokens, (value, start, length, axes))
                padded.meta["nn_module_stack"] = stack_up_to(call.node, site)
                where.set(padded)


def _move_slices(found: Region, start: int, length: int, tokens: int, from_tokens: set) -> list:
    """Slices of token values at the prefix-token boundary (``x[:, :, :n]``, ``x[:, :, n:]``) are
    moved past the prompts, which join the prefix tokens there."""
    if start <= 0:
        return []
    moved = []
    for node in found.nodes:
        if not (node.op == "call_function" and node.target is operator.getitem
                and node.args[0] in from_tokens and isinstance(node.args[1], tuple)):
            continue
        shape, index = _size(node.args[0], None), list(node.args[1])
        for axis, item in enumerate(index):
            if item is Ellipsis or not shape or axis >= len(shape):
                break
            if not isinstance(item, slice) or item.step is not None or shape[axis] != tokens:
                continue
            if item.start == start and item.stop is None:
                index[axis] = slice(start + length, None)
            elif item.start is None and item.stop == start:
                index[axis] = slice(None, start + length)
            else:
                continue
            node.update_arg(1, tuple(index))
            moved.append((node, axis))
    return moved


def _size(node, axis):
    """``node``'s traced shape (``axis`` None) or its size along ``axis``; None if unknown."""
    shape = getattr(getattr(node, "meta", {}).get("tensor_meta"), "shape", None)
    if shape is None:
        return None
    return tuple(shape) if axis is None else (shape[axis] if len(shape) >= -axis else None)


def _stamp(node: fx.Node, inside: fx.Node, site: str, like: fx.Node, added: int) -> None:
    """Give ``node`` the site's module stack and ``like``'s tensor metadata with ``added`` tokens."""
    node.meta["nn_module_stack"] = stack_up_to(inside, site)
    meta = like.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        shape = list(meta.shape)
        shape[1] += added
        stride = [1] * len(shape)
        for axis in range(len(shape) - 2, -1, -1):
            stride[axis] = stride[axis + 1] * shape[axis + 1]
        node.meta["tensor_meta"] = meta._replace(shape=torch.Size(shape), stride=tuple(stride))


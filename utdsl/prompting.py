"""The ``prompt`` placement: learned tokens joined to a region's input, removed at its output.

Input: a site whose region takes one token sequence x (B, N, C) and gives one y (B, N', C).
Output: the graph computes x' = [x[:, :n], P, x[:, n:]] right before the region's first use of x,
every use of x inside the region reads x', and every use of y outside reads
y' = [y[:, :n], y[:, n + L:]], where n is the model's prefix-token count (timm's
``num_prefix_tokens``: class, distillation and register tokens; 0 when the model has none) and P
the tuner's L tokens. Selecting the ``blocks`` stack gives VPT-shallow, each ``blocks.*`` VPT-deep
(each block's prompts replace the previous block's, as VPT does).

Invariants: the region's boundary is unchanged, so whatever reads y (the final norm, cls or avg
pooling, the head, another rule's joint) sees exactly the tokens it saw before; the inserted nodes
carry the site's module stack, so later rules on the same site wrap them. Tensor metadata inside a
prompted region keeps the traced token count (it is only used for sizes planned beforehand).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .joints import FULL
from .plan import SITE_ANALYZERS, Insertion, SiteError
from .resolve import Binding
from .rewrite import INSERTERS, build_units, shared_module
from .trace import Region, stack_up_to
from .tuners import SiteInfo

__all__ = ["PromptJoint", "drop_tokens", "analyze_prompt", "insert_prompt"]


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


def analyze_prompt(binding: Binding, found: Region, module, gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
    if binding.rule.selector.chunks is not None:
        raise SiteError("prompt tokens join a whole token sequence; chunks do not apply")
    x, y = _boundary(found)
    in_shape, out_shape = _tokens_shape(x, "input"), _tokens_shape(y, "output")
    if in_shape[2] != out_shape[2]:
        raise SiteError(f"prompt needs a region that keeps the width; it maps {in_shape[2]} to "
                         f"{out_shape[2]} channels")
    start = int(getattr(gm, "num_prefix_tokens", 0) or 0)
    if start > min(in_shape[1], out_shape[1]):
        raise SiteError(f"the model's {start} prefix tokens do not fit a sequence of {in_shape[1]}")
    extras = {"num_prefix_tokens": start, "tokens": in_shape[1], "in_shape": in_shape,
              "out_shape": out_shape, "patch_fan_in": _patch_fan_in(gm)}
    return SiteInfo(binding.path, in_shape[2], out_shape[2], extras), -1, -1


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


def insert_prompt(gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
    (x,) = found.tensor_inputs
    (y,) = found.outputs
    inside = set(found.nodes)
    start = insertion.info.extras["num_prefix_tokens"]
    joint = shared_module(gm, insertion.module_name, lambda: PromptJoint(build_units(gm, insertion), start))
    gm.add_submodule(insertion.module_name, joint)
    first_use = next(n for n in found.nodes if x in n.all_input_nodes)
    with gm.graph.inserting_before(first_use):
        joined = gm.graph.call_module(insertion.module_name, (x,))
    _stamp(joined, found.first, insertion.site, x, joint.length)
    for user in [u for u in x.users if u in inside]:
        user.replace_input_with(x, joined)

    outside_users = [u for u in y.users if u not in inside]
    with gm.graph.inserting_after(y):
        dropped = gm.graph.call_function(drop_tokens, (y, start, joint.length))
    _stamp(dropped, y, insertion.site, y, 0)
    for user in outside_users:
        user.replace_input_with(y, dropped)


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


SITE_ANALYZERS["prompt"] = analyze_prompt
INSERTERS["prompt"] = insert_prompt

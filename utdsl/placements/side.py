"""The ``side`` placement: a side network (Res-Tuning-Bypass; LST/DTL-style side paths) that reads
the frozen backbone without sending gradients into it.

    blocks.* -> side res_adapter(dim=32, at="^norm")

The rule's sites S_1 .. S_n (in the order the forward computes them) are *read sites*; ``at``
names one module P, the *injection point*. With x_0 the input of S_1 and h_i the output of S_i,
the chain runs

    s_0 = detach(x_0),    s_i = U_i(detach(h_i), s_{i-1}),

and P reads s_n in place of its input v (``join=replace``, Res-Tuning-Bypass: the official code
replaces the final norm's input) or detach(v) + s_n (``join=add``). Every value the chain or P
reads from the backbone is detached, so no gradient reaches the backbone through them, and where
nothing before P trains, autograd records nothing of the backbone's forward: a training step keeps
only the chain's own activations, and its backward runs through the chain and what follows P.

Input: sites with one tensor input and one tensor output, each shaped as P's input v (the chain
carries one state of that shape); a rule without chunks; P called once, with one tensor input that
the forward computes after every read site, and shared with another side rule only when both add
to it (P then reads detach(v) + s_a + s_b). Each of these is a compile-time error at the rule (the
injection point's errors at its ``at`` argument). Output: per site, a :class:`SideJoint`
called on (detach(h_i), s_{i-1}) right after h_i (registered as ``tuners.<site>.side_<tuner>``),
linked into a chain and injected at P once every insertion of the plan is in (:meth:`Side.finish`).

Invariants: the backbone's own nodes are untouched but for P reading s_n; chain nodes sit outside
every module's region (a later rule on a read site wraps what the rest of the model reads there,
which the chain then reads too). Not mergeable: ``utdsl.merge`` leaves the chain in place.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import Span
from ..resolve import Binding, closest_paths
from ..roles import role_paths
from ..selectors import matches
from ..trace import Region, region
from ..tuners import SiteInfo
from .base import FULL, Placement, SiteError, build_units, shared_module, tensor_shape
from .joint import joined_output

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Side", "SideJoint"]


class SideJoint(nn.Module):
    """One step of a side chain: s' = U(h, s) on the channel axis (moved last and back)."""

    def __init__(self, units: dict[str, nn.Module], axis: int):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.axis = axis

    def extra_repr(self) -> str:
        return f"axis={self.axis}"

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.axis == -1:
            return self.units[FULL](h, s)
        return self.units[FULL](h.movedim(self.axis, -1), s.movedim(self.axis, -1)).movedim(-1, self.axis)


@dataclass(frozen=True)
class _Link:
    """What :meth:`Side.finish` needs of a chain step (kept in its node's meta during a rewrite)."""

    chain: tuple        # (rule line, id of the rule's arguments): the steps of one rule
    start: fx.Node      # the site's input: the chain's first state when this step is the first
    into: str           # the injection point P
    join: str


_META = "utdsl_side"
_INJECTED = "utdsl_side_injected"
_CLAIMS = "utdsl_side_points"     # gm.meta during planning: injection point -> rules injecting there


class Side(Placement):
    name = "side"
    summary = "a chain over detached values of the sites, injected at the input of a later module (`at`)"

    @classmethod
    def label(cls, insertion: "Insertion") -> str:
        extras = insertion.info.extras
        return f"side → {extras['side_into']} ({extras['side_join']})"

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        if binding.chunks is not None:
            raise SiteError("a side chain reads whole values; this rule names chunks of one")
        shape, axis = joined_output(binding, found, module)
        (h,) = found.outputs
        inputs = found.tensor_inputs
        if len(inputs) != 1:
            raise SiteError(f"a side site takes one tensor input (the chain starts from the first site's), "
                            f"this one takes {len(inputs)}")
        args = binding.rule.args
        into, v = _injection_point(binding, gm)
        _claim(gm, into, binding)
        if v < h:
            raise SiteError(f"the injection point '{into}' reads its input before this site's output is "
                            "computed; a side chain is injected after the last value it reads",
                            "name a module that runs after every site of the rule (e.g. the final norm)",
                            span=_arg_span(binding, "at"))
        want = tensor_shape(v)
        for what, node in (("output", h), ("input", inputs[0])):
            if tensor_shape(node) != want:
                raise SiteError(f"this site's {what} is {_shape(tensor_shape(node))}, the injection point's "
                                f"input is {_shape(want)}; a side chain carries one state of that shape",
                                "read sites whose input and output are shaped as the injection point's input "
                                "(e.g. the blocks of one stage)")
        extras: dict[str, Any] = {"in_shape": shape, "out_shape": shape, "side_into": into, "side_join": args.join}
        return SiteInfo(binding.path, shape[axis], shape[axis], extras), axis, axis

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        (h,) = found.outputs
        (x,) = found.tensor_inputs
        joint = shared_module(gm, insertion.module_name,
                              lambda: SideJoint(build_units(gm, insertion), insertion.out_axis))
        gm.add_submodule(insertion.module_name, joint)
        graph = gm.graph
        with graph.inserting_after(h):
            read = graph.call_method("detach", (h,))
        with graph.inserting_after(read):
            step = graph.call_module(insertion.module_name, (read, x))
        for node in (read, step):
            node.meta["nn_module_stack"] = {}          # outside every module's region
            if "tensor_meta" in h.meta:
                node.meta["tensor_meta"] = h.meta["tensor_meta"]
        extras = insertion.info.extras
        step.meta[_META] = _Link((insertion.rule_line, id(insertion.args)), x, extras["side_into"],
                                 extras["side_join"])

    @classmethod
    def finish(cls, gm: fx.GraphModule) -> None:
        """Link each rule's steps in graph order (the first starts from its site's detached input)
        and inject the last one's state at the rule's injection point."""
        chains: dict[tuple, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            link = node.meta.get(_META)
            if link is not None:
                chains.setdefault(link.chain, []).append(node)
        graph = gm.graph
        for key in sorted(chains, key=lambda k: k[0]):
            steps = chains[key]
            first: _Link = steps[0].meta.pop(_META)
            with graph.inserting_before(steps[0]):
                start = graph.call_method("detach", (first.start,))
            start.meta["nn_module_stack"] = {}
            steps[0].update_arg(1, start)
            for previous, step in zip(steps, steps[1:]):
                step.meta.pop(_META, None)
                step.update_arg(1, previous)
            _inject(graph, steps[-1], first.into, first.join)


def _inject(graph: fx.Graph, state: fx.Node, into: str, join: str) -> None:
    found = region(graph, into)
    (v,) = found.tensor_inputs
    new = state
    if join == "add":            # v detached too (unless another chain's sum): no gradient reaches the backbone
        read = v
        if not v.meta.get(_INJECTED):
            with graph.inserting_after(max(v, state)):
                read = graph.call_method("detach", (v,))
        with graph.inserting_after(max(read, state)):
            new = graph.call_function(operator.add, (read, state))
        for node in (read, new):
            node.meta["nn_module_stack"] = {}
            if "tensor_meta" in v.meta:
                node.meta["tensor_meta"] = v.meta["tensor_meta"]
        new.meta[_INJECTED] = True
    for node in found.nodes:
        node.replace_input_with(v, new)


def _claim(gm: fx.GraphModule, into: str, binding: Binding) -> None:
    """Record that ``binding``'s rule injects at ``into``; two rules may share an injection point
    only when both add to it (one replacing the input would discard the other's chain)."""
    rule = binding.rule
    claims = gm.meta.setdefault(_CLAIMS, {}).setdefault(into, {})
    claims.setdefault(id(rule), (rule, rule.span.line, rule.args.join))   # the rule pins its id
    others = [(line, join) for key, (_, line, join) in claims.items() if key != id(rule)]
    if others and (rule.args.join == "replace" or any(join == "replace" for _, join in others)):
        raise SiteError(f"the rule at line {others[0][0]} also injects a side chain at '{into}'; rules sharing "
                        "an injection point must all add to it (join=add)",
                        "give each chain its own injection point, or join=add", span=_arg_span(binding, "at"))


def _injection_point(binding: Binding, gm: fx.GraphModule) -> tuple[str, fx.Node]:
    """The module the rule's ``at`` names and the one tensor its call reads."""
    from ..tuners.res_adapter import parse_selector

    text = binding.rule.args.at
    span = _arg_span(binding, "at")
    selector = parse_selector(text)
    paths = [name for name, _ in gm.named_modules() if name]
    roles = role_paths(gm)
    found = [path for path in paths if matches(selector, path, roles)]
    if not found:
        raise SiteError(f"the injection point at=\"{text}\" matches no module of the model",
                        "closest real paths: " + ", ".join(closest_paths(text, paths)), span=span)
    if len(found) > 1:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise SiteError(f"the injection point at=\"{text}\" matches {len(found)} modules ({shown}); "
                        "a side chain is injected at one", "root the path (\"^norm\") or name it in full",
                        span=span)
    (into,) = found
    point = region(gm.graph, into)
    if point is None:
        raise SiteError(f"the injection point '{into}' is never called by the forward", span=span)
    inputs = point.tensor_inputs
    if len(inputs) != 1:
        raise SiteError(f"the injection point '{into}' reads {len(inputs)} tensors; the chain replaces "
                        "or adds to a module's one input", span=span)
    return into, inputs[0]


def _arg_span(binding: Binding, name: str) -> Span | None:
    """The span of argument ``name``'s value in the rule (or in its tuner's declaration)."""
    arg = next((a for a in binding.rule.tuner.args if a.name == name), None)
    return getattr(arg.value, "span", None) if arg is not None else None


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))

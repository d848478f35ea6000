"""Span sites: a run of consecutive operations inside a module, as one site.

A selector path followed by ``(A .. B)`` (:class:`~utdsl.syntax.Run`) binds the site
``PARENT(A..B)``: the operations of the matched module ``PARENT`` from the input of its child ``A``
to the output of its child ``B``; ``(A ..< B)`` ends at the value ``B`` reads instead (``B``
excluded), which takes in what happens between the children (a residual add, a reshape). The site
path is a string (:func:`site_path`) that stages pass around like a module path; :func:`span_region`
finds its nodes, and ``parallel``/``sequential`` attach to it as to a module's region.

The region of ``P(A..B)``: the nodes of ``P`` that depend on ``A``'s input x and lead to the end
value (the last node of the children ``A`` .. ``B``, in the parent's order; or the value ``B``
reads), plus the nodes inserted at the site since. Its input is x, its output the end value. A
child with no nodes in one mode's graph (timm's ``DropPath`` in eval mode returns its input) is
simply absent from that graph's region.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from .syntax import Run
from .trace import Region, module_path_of

__all__ = ["SpanSite", "site_path", "parse_site", "is_span", "site_key", "span_region", "check_children"]

_SITE = re.compile(r"^(?P<parent>.*)\((?P<start>[A-Za-z0-9_]+)(?P<op>\.\.<?)(?P<end>[A-Za-z0-9_]+)\)$")


@dataclass(frozen=True)
class SpanSite:
    parent: str
    start: str
    end: str
    inclusive: bool

    @property
    def path(self) -> str:
        return site_path(self.parent, Run(self.start, self.end, self.inclusive, None))


def site_path(parent: str, run: Run) -> str:
    """``blocks.3(norm2..drop_path2)``: the site path of ``run`` inside the module ``parent``."""
    return f"{parent}({run.start}{'..' if run.inclusive else '..<'}{run.end})"


def is_span(path: str) -> bool:
    return path.endswith(")") and "(" in path


def parse_site(path: str) -> SpanSite:
    match = _SITE.match(path)
    if match is None:
        raise ValueError(f"not a span site path: {path!r}")
    return SpanSite(match["parent"], match["start"], match["end"], match["op"] == "..")


def site_key(path: str) -> str:
    """A dotted module name for what is registered at ``path`` (``blocks.3.span_norm2_to_drop_path2``)."""
    if not is_span(path):
        return path
    site = parse_site(path)
    return f"{site.parent}.span_{site.start}_{'to' if site.inclusive else 'upto'}_{site.end}"


def check_children(parent: str, names: list[str], run: Run) -> str | None:
    """Why ``run`` does not fit a module whose children are ``names`` (in order), or None."""
    for name in (run.start, run.end):
        if name not in names:
            from .errors import closest
            near = closest(name, names)
            return (f"'{parent}' has no child '{name}'"
                    + (f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else f"; its children: {', '.join(names)}"))
    if names.index(run.start) > names.index(run.end) or (not run.inclusive and run.start == run.end):
        return f"'{run.start}' does not come before '{run.end}' in '{parent}'"
    return None


def _children(graph: fx.Graph, parent: str, nodes: list[fx.Node]) -> list[str]:
    """The parent's children in declaration order (from the owning module), else by first call."""
    owner = graph.owning_module
    if owner is not None:
        try:
            return [name for name, _ in owner.get_submodule(parent).named_children()]
        except AttributeError:
            pass
    prefix = parent + "."
    seen: dict[str, None] = {}
    for node in nodes:
        for path in module_path_of(node):
            if path.startswith(prefix):
                seen.setdefault(path[len(prefix):].split(".")[0], None)
    return list(seen)


def _members(graph: fx.Graph, site: SpanSite, nodes: list[fx.Node]) -> set[str]:
    """The children the span runs through: as ``resolve`` recorded them from the model (the
    owning GraphModule's ``meta["utdsl_spans"]``: a traced graph lacks the modules that compute
    nothing in it, timm's DropPath in eval mode), else from the traced children's order."""
    owner = graph.owning_module
    recorded = (getattr(owner, "meta", None) or {}).get("utdsl_spans", {}).get(site.path)
    if recorded is not None:
        return set(recorded)
    from .placements.base import SiteError

    children = _children(graph, site.parent, nodes)
    for name in (site.start, site.end):
        if name not in children:
            raise SiteError(f"'{site.parent}' has no child '{name}' in the traced graph")
    first, last = children.index(site.start), children.index(site.end)
    return set(children[first:last + 1] if site.inclusive else children[first:last])


def _child_of(node: fx.Node, prefix: str) -> str | None:
    for path in module_path_of(node):
        if path.startswith(prefix):
            return path[len(prefix):].split(".")[0]
    return None


def span_region(graph: fx.Graph, path: str) -> Region | None:
    """The region of the span site ``path`` in ``graph`` (see the module docstring); None when the
    parent module has no nodes. A span whose first child takes other than one tensor, or whose
    children have no nodes, is a :class:`~utdsl.placements.SiteError`."""
    from .placements.base import SiteError   # placements import this module's users
    from .trace import region

    site = parse_site(path)
    outer = region(graph, site.parent)
    if outer is None:
        return None
    prefix = site.parent + "."
    members = _members(graph, site, outer.nodes)
    start = region(graph, prefix + site.start)
    if start is None:
        raise SiteError(f"the span's first module '{site.start}' has no operations in the traced graph",
                        "start the span at a module that computes something")
    if len(start.tensor_inputs) != 1:
        raise SiteError(f"the span's first module '{site.start}' takes {len(start.tensor_inputs)} tensors; "
                        "a span starts at a module with one tensor input")
    (x,) = start.tensor_inputs
    if site.inclusive:
        ends = [n for n in outer.nodes if _child_of(n, prefix) in members]
        if not ends:
            raise SiteError(f"the modules '{site.start}' .. '{site.end}' have no operations in the traced graph")
        end = ends[-1]
    else:
        stop = region(graph, prefix + site.end)
        if stop is None or len(stop.tensor_inputs) != 1:
            raise SiteError(f"the span ends at the value '{site.end}' reads, but '{site.end}' "
                            f"{'is never called' if stop is None else 'reads several tensors'}")
        (end,) = stop.tensor_inputs
    inside = set(outer.nodes)
    reach = {x}
    for node in outer.nodes:
        if any(arg in reach for arg in node.all_input_nodes):
            reach.add(node)
    lead = {end}
    for node in reversed(outer.nodes):
        if node in lead:
            lead.update(arg for arg in node.all_input_nodes if arg in inside)
    # the members' own nodes count even when nothing reads them (DropPath's in-place div_)
    nodes = [n for n in outer.nodes
             if (n in reach and n is not x and (n in lead or _child_of(n, prefix) in members))
             or path in module_path_of(n)]
    if not nodes:
        raise SiteError(f"no operations lie between the input of '{site.start}' and the end of the span")
    return _bounded(path, nodes, x)


def _bounded(path: str, nodes: list[fx.Node], x: fx.Node) -> Region:
    inside = set(nodes)
    inputs: dict[fx.Node, None] = {x: None}
    outputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                inputs[arg] = None
        if any(user not in inside for user in node.users) and _is_tensor(node):
            outputs[node] = None      # shape values read later (Swin's B, H, W, C) are not the site's output
    return Region(path, nodes, list(inputs), list(outputs), 0)


def _is_tensor(node: fx.Node) -> bool:
    return hasattr(node.meta.get("tensor_meta"), "shape")

"""Stage ``plan``: bindings + the traced graph's shapes -> :class:`Plan`, a printable list of
insertions. Tuner sizes come from fx shape propagation (on meta tensors or fake tensors, so no
real forward runs); nothing is inserted yet.

What a site must look like, and the sizes its tuner gets, is the placement's ``analyze``
(:mod:`utdsl.placements`); here is what every placement shares: the site is called once, the tuner
builds with the sizes found, the insertion is recorded.

Invariants: one :class:`Insertion` per (rule, site), in the order ``rewrite`` applies them; every
insertion's sizes are final; a site that is never called, or whose boundary does not fit the
placement, is an error pointing at its rule.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from . import placements, tuners
from .errors import Diagnostic, ModelError, SpecError, listing, raise_if_any
from .layout import probe_layouts
from .placements import SiteError
from .placements.base import has_parameter
from .placements.weight import plan_shared
from .placements.grid import token_grid
from .resolve import Binding, Bindings
from .shapes import RepeatShapeProp
from .spans import is_span, site_key
from .syntax import Chunks
from .trace import indexed_regions, leaf_enclosing, region
from .tuners import SiteInfo, TunerArgs

__all__ = ["Insertion", "Plan", "plan", "propagate_shapes", "probe_layouts"]


@dataclass(frozen=True)
class Insertion:
    """One tuner to insert: where, how, and with which sizes."""

    site: str
    placement: str
    tuner: str
    args: TunerArgs
    chunks: Chunks | None
    info: SiteInfo
    in_axis: int              # channel axis of the site's input (-1 or 1)
    out_axis: int             # channel axis of the site's output
    params: int
    identity_at_init: bool
    mergeable: bool
    rule_line: int
    module_name: str          # where rewrite registers the tuner in the GraphModule
    declaration: str | None = None   # the declared tuner the rule names: its sites share state

    def describe(self) -> dict[str, Any]:
        return {
            "site": self.site + (str(self.chunks) if self.chunks else ""),
            "placement": self.placement,
            "tuner": self.tuner,
            "args": self.args.model_dump(mode="json"),
            "in": self.info.in_features,
            "out": self.info.out_features,
            "params": self.params,
            "identity_at_init": self.identity_at_init,
            "mergeable": self.mergeable,
            "module": self.module_name,
            "rule_line": self.rule_line,
        }


@dataclass
class Plan:
    insertions: list[Insertion]
    trained: list[str]                   # base parameter names that train
    trained_params: int                  # their element count
    base_params: int                     # every parameter of the base model
    warnings: list[Diagnostic] = field(default_factory=list)
    shared_params: int = 0               # state shared by a rule's sites (VeRA, FacT), counted once

    @property
    def tuner_params(self) -> int:
        return sum(i.params for i in self.insertions) + self.shared_params

    @property
    def trainable_params(self) -> int:
        return self.tuner_params + self.trained_params

    def to_json(self) -> str:
        return json.dumps({
            "insertions": [i.describe() for i in self.insertions],
            "trained": self.trained,
            "tuner_params": self.tuner_params,
            "shared_params": self.shared_params,
            "trained_base_params": self.trained_params,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "trainable_percent": 100.0 * self.trainable_params / max(1, self.base_params + self.tuner_params),
        }, indent=2)


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Fill ``node.meta['tensor_meta']`` without computing: the graph runs on meta tensors (the
    parameters swapped for meta stand-ins for the duration), or under a FakeTensorMode when some
    operation has no meta kernel."""
    if example_input.device.type == "meta":
        RepeatShapeProp(gm).propagate(example_input)
        return
    try:
        from torch.nn.utils.stateless import _reparametrize_module

        stand_ins = {name: torch.empty_like(t, device="meta")
                     for name, t in (*gm.named_parameters(), *gm.named_buffers())}
        with _reparametrize_module(gm, stand_ins):
            RepeatShapeProp(gm).propagate(torch.empty_like(example_input, device="meta"))
        return
    except Exception:  # an op without a meta kernel, or a tensor made on another device
        pass
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(example_input))


def plan(bindings: Bindings, gm: fx.GraphModule, example_input: torch.Tensor,
         tuner_namespace: str = "tuners") -> Plan:
    """Size every binding's tuner from the shapes of ``gm`` (traced, untouched) on ``example_input``."""
    if bindings.spans:   # span sites look their members up here, in every graph of gm (utdsl.spans)
        gm.meta.setdefault("utdsl_spans", {}).update(bindings.spans)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before raising
            propagate_shapes(gm, example_input)
    except Exception as error:  # the model's own checks (timm asserts the image size), shape errors
        shape = "x".join(map(str, example_input.shape))
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, RuntimeError) and error.__cause__ is not None:
            cause = str(error.__cause__).splitlines()[0] or cause  # ShapeProp wraps the real error
        raise ModelError(f"the example input ({shape}) does not run through the model: {cause}",
                         hint="pass an input of the size the model was built for (timm: img_size=..., "
                              "or dynamic_img_size=True)") from error
    probe_layouts(gm, example_input)
    modules = dict(gm.named_modules())
    insertions: list[Insertion] = []
    diagnostics: list[Diagnostic] = list(bindings.warnings)
    failed: dict[tuple, list[str]] = {}   # one diagnostic per rule and reason, naming its sites
    sizes: dict = {}    # parameters of a unit by (rule arguments, site shape): blocks repeat
    with indexed_regions(gm):
        for binding in bindings.bindings:
            try:
                insertions.append(_plan_one(binding, gm, modules, tuner_namespace, sizes))
            except SiteError as error:
                failed.setdefault((error.span or binding.rule.span, error.message, error.hint),
                                  []).append(binding.path)
    for (span, message, hint), paths in failed.items():
        more = f" (and {len(paths) - 1} more like it: {listing(paths[1:], most=3)})" if len(paths) > 1 else ""
        diagnostics.append(Diagnostic(f"{paths[0]}{more}: {message}", span, hint))
    raise_if_any(diagnostics, SpecError)
    parameters = dict(gm.named_parameters())
    trained_params = sum(parameters[name].numel() for name in bindings.trained if name in parameters)
    base_params = sum(p.numel() for p in parameters.values())
    shared = plan_shared(insertions, tuner_namespace)
    return Plan(insertions, list(bindings.trained), trained_params, base_params,
                [d for d in diagnostics if d.severity == "warning"], shared)


def _plan_one(binding: Binding, gm: fx.GraphModule, modules: dict, namespace: str, sizes: dict) -> Insertion:
    rule = binding.rule
    tuner_cls = tuners.get(rule.tuner.name)
    if has_parameter(gm, binding.path):   # a raw parameter (pos_embed): resolve binds them for `weight`
        info, in_axis, out_axis = placements.get(rule.placement).analyze_parameter(binding, gm)
    else:
        info, in_axis, out_axis = _analyze_module(binding, gm, modules)
    try:
        if hasattr(tuner_cls, "check_site"):
            tuner_cls.check_site(rule.args, info)
        key = (rule.tuner.name, id(rule.args), info.in_features, info.out_features, repr(info.extras))
        per_unit = sizes.get(key)
        if per_unit is None:
            with torch.device("meta"):
                unit = tuner_cls.build(rule.args, info)
            per_unit = sizes[key] = sum(p.numel() for p in unit.parameters())
    except (ValueError, TypeError) as error:
        raise SiteError(f"cannot build {rule.tuner.name} here: {error}") from error
    units = len(binding.chunks.indices) if binding.chunks else 1
    return Insertion(
        site=binding.path, placement=rule.placement, tuner=rule.tuner.name, args=rule.args,
        chunks=binding.chunks, info=info, in_axis=in_axis, out_axis=out_axis,
        params=per_unit * units, identity_at_init=tuner_cls.identity_at_init(rule.args),
        mergeable=tuner_cls.mergeable_with(rule.args, rule.placement)
        and info.extras.get("conv", {}).get("groups", 1) == 1 and not is_span(binding.path),
        rule_line=rule.span.line, declaration=rule.declaration,
        module_name=f"{namespace}.{site_key(binding.path)}.{rule.placement}_{rule.tuner.name}",
    )


def _analyze_module(binding: Binding, gm: fx.GraphModule, modules: dict) -> tuple[SiteInfo, int, int]:
    """The placement's analysis of a module site, once the forward is known to use the module."""
    rule = binding.rule
    found = region(gm.graph, binding.path)
    if found is None:
        leaf = leaf_enclosing(gm.graph, binding.path)
        if leaf is not None and leaf in modules:
            raise SiteError(f"this module runs inside '{leaf}' ({type(modules[leaf]).__name__}), which the "
                             "tracer keeps as one opaque call (torch.nn's own modules and those timm registers as not "
                             "traceable are not traced into)",
                             f"tune '{leaf}' itself, or a module outside it")
        raise SiteError("this module is never called by the model's forward",
                         "select a module that the forward pass uses (see `utdsl inspect`)")
    placement = placements.get(rule.placement)
    if found.calls > 1 and placement.single_use:
        raise SiteError(f"this module is never called, and its weight is used by {found.calls} "
                         "functional calls; a tuner attaches to one use",
                         "select a module that is called, or one whose weight the forward uses once")
    if is_span(binding.path) and rule.placement not in ("parallel", "sequential"):
        raise SiteError(f"a span site takes `parallel` or `sequential`, not `{rule.placement}`")
    info, in_axis, out_axis = placement.analyze(binding, found, modules.get(binding.path), gm)
    if getattr(tuners.get(rule.tuner.name), "token_grid", False):   # a convolutional tuner on tokens
        info = token_grid(info, gm, found, rule.placement)
    return info, in_axis, out_axis

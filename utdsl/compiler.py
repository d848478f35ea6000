"""``utdsl.compile``: the stages chained, spec + model -> tuned ``torch.fx.GraphModule``.

    text --parse--> Spec --check--> Spec --resolve(model)--> Bindings
         --plan(shapes)--> Plan --rewrite--> GraphModule --(verify)--> Report

The model is traced in train mode and in eval mode (fx bakes ``self.training`` branches such as
DropPath in at trace time; once when the two are the same, see :func:`~utdsl.modes.trace_modes`);
the plan is made on the eval graph and rewritten into each distinct graph with the same tuner
instances, and the result is a :class:`~utdsl.modes.ModalGraphModule`
whose ``train()``/``eval()`` select the graph.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from . import backends
from .collector import collector_paused
from .errors import ModelError
from .modes import ModalGraphModule, trace_modes
from .trace import indexed_regions, leaf_enclosing
from .plan import Plan, plan as make_plan, propagate_shapes
from .resolve import resolve
from .rewrite import rewrite
from .syntax import Spec

__all__ = ["CompiledInfo", "compile", "parse_spec", "load_spec", "model_name_of", "default_example_input"]


@dataclass
class CompiledInfo:
    """What ``compile`` records on the model (``gm.meta["utdsl"]``)."""

    spec: Spec
    plan: Plan
    model_name: str
    plan_namespace: str


def parse_spec(text: str, path: str = "<string>") -> Spec:
    """Parse spec text into an (unchecked) :class:`Spec`; syntax errors raise SpecError."""
    from .parse import parse

    return parse(text, path)


def load_spec(path: str | os.PathLike, overrides: Mapping[str, str] | None = None) -> Spec:
    """Read, parse and check a spec file, or a library spec by name (``"lora"``).

    ``overrides`` replace ``let`` bindings (``{"r": "16"}``), as ``--set r=16`` does."""
    from .check import check
    from .library import find_spec

    from .files import read_spec_text

    file = find_spec(path)
    return check(parse_spec(read_spec_text(file), str(file)), overrides)


def model_name_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        tag = cfg.get("tag")
        return cfg["architecture"] + (f".{tag}" if tag else "")
    return type(model).__name__


def default_example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random batch shaped as the model's configured input, on the model's device."""
    if backends.uses_export(model):
        return backends.example_input_for(model, batch)
    from .runtime.models import default_input_size

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return torch.randn(batch, *default_input_size(model), device=device)


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are new ``Parameter`` objects over the same storage:
    nothing done to the copy's flags reaches ``model``, and no weight is copied. Buffers are
    copied; parameters that will train are given storage of their own by :func:`_own_storage`."""
    memo: dict = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return _copy_module(model, memo)


_EMPTY_COPIES = {dict: dict, OrderedDict: OrderedDict, set: set}


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(module, memo)``, as deepcopy rebuilds a module (a new object of its class,
    its ``__dict__`` deep-copied), but with the dozen empty hook dictionaries of every module made
    anew rather than through deepcopy's machinery: half the time of a deep model's copy. Modules
    that customise copying or pickling get ``copy.deepcopy`` itself."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if getattr(cls, "__deepcopy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__ \
            or cls.__getstate__ is not nn.Module.__getstate__ or cls.__setstate__ is not nn.Module.__setstate__:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_compiled_call_impl":      # as nn.Module.__getstate__ leaves it out
            continue
        if key == "_modules":
            state[key] = {name: None if child is None else _copy_module(child, memo) for name, child in value.items()}
        elif type(value) in _EMPTY_COPIES and not value:
            state[key] = _EMPTY_COPIES[type(value)]()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _own_storage(gm: nn.Module, names: set[str]) -> None:
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name in names:
                p.data = p.data.clone()


def _namespace(model: nn.Module) -> str:
    name = "tuners"
    while hasattr(model, name):
        name = "utdsl_" + name
    return name


def compile(spec: Spec | str | os.PathLike, model: nn.Module, example_input: torch.Tensor | None = None,
            *, inplace: bool = False, model_name: str | None = None,
            overrides: Mapping[str, str] | None = None) -> ModalGraphModule:
    """Compile ``spec`` into ``model`` and return the tuned ``GraphModule``.

    ``spec`` is a checked or parsed :class:`Spec`, spec text, a path or a library name. Base
    parameters keep their names and are frozen except those the spec ``train``s; tuners train.
    ``model`` itself is left as it was unless ``inplace``: the result gets its own module tree,
    ``Parameter`` objects, buffers and copies of the parameters that train, but shares the
    *storage* of the frozen weights with ``model`` (no second copy of the backbone in memory), so
    writing into a frozen weight of one in place shows in the other. ``example_input`` (default: a random batch of
    the model's configured input size) only sizes the tuners: no real forward runs. The result
    starts in ``model``'s mode and behaves as ``model`` does in each mode (dropout, DropPath).
    """
    with collector_paused():
        return _compile(spec, model, example_input, inplace, model_name, overrides)


def _compile(spec, model: nn.Module, example_input, inplace: bool, model_name: str | None,
             overrides) -> ModalGraphModule:
    spec = _as_checked_spec(spec, overrides)
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    base = backends.prepare(model if inplace else _structural_copy(model))
    bindings = resolve(spec, base)
    example = example_input if example_input is not None else default_example_input(base)
    gm = trace_modes(base, example, codegen=False)     # rewrite generates the code
    if not backends.fixed_token_count(gm) and _sites_in_opaque_blocks(gm, base, bindings):
        gm = _export_or_keep(base, example, gm)
    namespace = _namespace(base)
    gm.select_graph(False)
    planned = gm.graph
    the_plan = make_plan(bindings, gm, example, namespace)
    for graph in gm.each_graph():
        if graph is not planned:
            propagate_shapes(gm, example)
        rewrite(gm, the_plan)
    trained = set(the_plan.trained)
    if not inplace:
        _own_storage(gm, trained)
    for name, p in gm.named_parameters():
        p.requires_grad_(name.startswith(namespace + ".") or name in trained)
    gm.meta["utdsl"] = CompiledInfo(spec, the_plan, model_name or model_name_of(model), namespace)
    gm.select_graph(model.training)
    gm.generate_code()
    gm.train(model.training)
    return gm


def _sites_in_opaque_blocks(gm: ModalGraphModule, base: nn.Module, bindings) -> bool:
    """Whether a bound site lies inside a module the symbolic trace keeps whole that is not one of
    torch.nn's own (those are leaves by design; their insides are parameters, not modules)."""
    with indexed_regions(gm):
        for binding in bindings.bindings:
            leaf = leaf_enclosing(gm.graph, binding.path)
            if leaf is not None and not type(base.get_submodule(leaf)).__module__.startswith("torch.nn"):
                return True
    return False


def _export_or_keep(base: nn.Module, example: torch.Tensor, traced: ModalGraphModule) -> ModalGraphModule:
    """A site lies inside a module torch.fx keeps as one opaque call (timm's not-traceable blocks,
    e.g. MobileViT's): trace by torch.export, which records every module's operations. If export
    fails too, keep the symbolic trace; ``plan`` then names the enclosing module."""
    try:
        return trace_modes(base, example, route="export", codegen=False)
    except ModelError:
        return traced


def _as_checked_spec(spec, overrides) -> Spec:
    from .library import is_spec_reference

    if isinstance(spec, Spec) and _is_checked(spec) and not overrides:
        return spec
    from .check import check

    if isinstance(spec, Spec):
        return check(spec, overrides)
    if isinstance(spec, os.PathLike) or is_spec_reference(spec):
        return load_spec(spec, overrides)
    return check(parse_spec(str(spec)), overrides)


def _is_checked(spec: Spec) -> bool:
    from .syntax import Rule, Train, Freeze

    return all(isinstance(s, (Rule, Train, Freeze)) for s in spec.statements) and all(
        r.args is not None for r in spec.rules)

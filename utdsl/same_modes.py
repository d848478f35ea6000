"""Whether a model traces to the same graph in train and in eval mode, without tracing it twice.

A symbolic trace can differ between the modes only where the forward reads some module's
``training``. :class:`_TrainingReads` records, during a trace, which module calls read it;
:func:`same_in_both_modes` traces each of those modules alone in both modes, on the arguments it
got (proxies where it got traced values, the constants it got otherwise), one per distinct
configuration (:func:`_signature`), and compares the graphs (:func:`same_graph`). When every one
of them gives the same graph both ways, so does the model: up to the first read the two traces
run the same code, and each read's module, traced alike in both modes, leaves them running the
same code on. A read in the model's own forward, or a module that does not trace alone, means
tracing the model again (:func:`utdsl.modes.trace_modes` does).
"""

from __future__ import annotations

import inspect
import types
import warnings

import torch
import torch.fx as fx
from torch import nn

from .trace import BackboneTracer

__all__ = ["same_graph", "same_in_both_modes", "TrainingReads"]


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two graphs run the same operations on the same arguments (node names aside)."""
    if len(a.nodes) != len(b.nodes):
        return False
    index_a = {node: i for i, node in enumerate(a.nodes)}
    index_b = {node: i for i, node in enumerate(b.nodes)}
    try:
        for x, y in zip(a.nodes, b.nodes):
            if x.op != y.op or x.target != y.target or type(x.target) is not type(y.target):
                return False
            if fx.node.map_arg((x.args, x.kwargs), index_a.__getitem__) != \
                    fx.node.map_arg((y.args, y.kwargs), index_b.__getitem__):
                return False
    except (RuntimeError, TypeError, ValueError):  # a tensor constant compared: call it different
        return False
    return True


class TrainingReads:
    """For the length of a trace, a data descriptor on ``nn.Module.training`` that records, on
    every read of any module's ``training``, the module call being traced then (the tracer's
    innermost, else the traced root): ``readers`` maps id(module) -> (module, {id(call): call}).
    ``readers`` is None when it cannot record (a class defines ``training`` itself, or another
    trace records already)."""

    def __init__(self, tracer: BackboneTracer, root: nn.Module):
        self.tracer, self.root = tracer, root
        self.readers: dict[int, tuple[nn.Module, dict]] | None = None

    def __enter__(self) -> "TrainingReads":
        classes = {cls for module in self.root.modules() for cls in type(module).__mro__}
        if not any("training" in vars(cls) for cls in classes):
            self.readers = {}
            nn.Module.training = self      # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        if self.readers is not None and vars(nn.Module).get("training") is self:
            del nn.Module.training

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        try:
            value = obj.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None
        if self.readers is not None:
            call = self.tracer.calls[-1] if self.tracer.calls else (self.root, None, None)
            self.readers.setdefault(id(call[0]), (call[0], {}))[1][id(call)] = call
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__["training"] = value


def same_in_both_modes(model: nn.Module, readers: dict[int, tuple[nn.Module, dict]]) -> bool:
    """Whether every module call that read ``training`` traces alone to the same graph in train
    and in eval mode (one call per distinct module configuration and arguments)."""
    if id(model) in readers:
        return False       # the whole model reads it: tracing it again is the check
    checked: set = set()
    for module, calls in readers.values():
        for call in calls.values():
            try:
                key = (_signature(module), _value_key(call[1:]))
            except _Unknown:
                key = None
            if key is not None and key in checked:
                continue
            if not _traces_alike(*call):
                return False
            if key is not None:
                checked.add(key)
    return True


def _traces_alike(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """``module`` traced alone in train and in eval mode, its arguments proxies where they were
    traced values and constants where they were constants, gives the same graph."""
    concrete = _concrete_args(module, args, kwargs)
    if concrete is None:
        return False
    was = module.training
    graphs = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in (True, False):
                module.train(mode)
                graphs.append(BackboneTracer().trace(module, concrete_args=concrete))
    except Exception:  # noqa: BLE001 - anything that does not trace alone: trace the model again
        return False
    finally:
        module.train(was)
    return same_graph(*graphs)


def _concrete_args(module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    concrete = {}
    for name, param in signature.parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if bound.arguments.get(name):
                return None
            continue
        if name in bound.arguments:
            value = bound.arguments[name]
            if isinstance(value, fx.Proxy):
                continue
            found: list = []
            fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
            if found:
                return None
            concrete[name] = value
        elif param.default is not inspect.Parameter.empty:
            concrete[name] = param.default
        else:
            return None
    return concrete


class _Unknown(Exception):
    pass


_PLAIN = (int, float, bool, str, complex, type(None), torch.dtype, torch.device, type(Ellipsis))
_MODULE_STATE = frozenset(nn.Module().__dict__)     # torch's own per-module state


def _value_key(value):
    """A hashable stand-in for an argument or attribute: plain values by type and value, traced
    values as one kind, functions and classes by identity; anything else is :class:`_Unknown`."""
    if isinstance(value, fx.Proxy):
        return fx.Proxy
    if isinstance(value, _PLAIN):
        return type(value), value
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_value_key(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((k, _value_key(v)) for k, v in value.items())
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return value
    raise _Unknown


def _signature(module: nn.Module):
    """Modules with equal signatures trace alike: the same class, equal plain attributes, the same
    parameter and buffer shapes, children of equal signatures. Hooks or other attributes make a
    module :class:`_Unknown`."""
    state = module.__dict__
    if state.get("_forward_hooks") or state.get("_forward_pre_hooks"):
        raise _Unknown
    attributes = tuple((k, _value_key(v)) for k, v in state.items() if k not in _MODULE_STATE)
    tensors = tuple((k, None if t is None else (tuple(t.shape), t.dtype, t.requires_grad))
                    for k, t in (*module._parameters.items(), *module._buffers.items()))
    children = tuple((k, None if m is None else _signature(m)) for k, m in module._modules.items())
    return type(module), attributes, tensors, children

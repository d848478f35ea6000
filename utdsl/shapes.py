"""Shape propagation on meta tensors that runs each distinct operation once.

Input: a GraphModule whose parameters and input are meta tensors. Output: ``node.meta['tensor_meta']``
and ``node.meta['type']`` on every node, as :class:`torch.fx.passes.shape_prop.ShapeProp` writes
them. A deep model repeats its blocks: a node whose operation and arguments equal an earlier
node's (tensors compared by shape, strides, offset, dtype, device and ``requires_grad``; other
arguments by type and value) takes that node's result as fresh meta tensors of the same layout, so
each block after the first costs a dictionary lookup a node instead of a meta kernel (on ViT-g/14,
1,800 nodes: 0.55 s -> 0.1 s).

Invariants: only operations whose result's metadata is a function of the key are reused: calls of
functions and tensor methods, and calls of torch.nn's own leaf modules without children or hooks
(keyed by type, ``extra_repr``, mode and parameter shapes); in-place operations, ``out=`` calls,
arguments of other types and non-meta tensors always run. Results never alias one another.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["OpMemo", "RepeatShapeProp", "op_memo"]

_PLAIN = (int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.layout, type(Ellipsis))
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
             operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
             operator.ilshift, operator.irshift, operator.setitem}


class _Skip(Exception):
    pass


class _Meta:
    """A meta tensor's layout, to make fresh ones of."""

    __slots__ = ("shape", "stride", "offset", "dtype", "requires_grad")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()
        self.dtype, self.requires_grad = t.dtype, t.requires_grad

    def make(self) -> torch.Tensor:
        if not self.requires_grad:
            t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
            return t.as_strided(self.shape, self.stride, self.offset) if self.offset else t
        # a view of a non-leaf, as results computed from parameters are: in-place ops stay allowed
        extent = 0 if 0 in self.shape else 1 + self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        base = torch.empty(extent, dtype=self.dtype, device="meta", requires_grad=True).clone()
        return base.as_strided(self.shape, self.stride, self.offset)


def _key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or value.layout is not torch.strided:
            raise _Skip
        return (torch.Tensor, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype,
                value.requires_grad)
    if isinstance(value, _PLAIN):
        return type(value), value
    if isinstance(value, (tuple, list)):       # torch.Size is a tuple
        return type(value), tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((k, _key(v)) for k, v in value.items())
    if isinstance(value, slice):
        return slice, _key(value.start), _key(value.stop), _key(value.step)
    raise _Skip


def _template(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or value.layout is not torch.strided:
            raise _Skip
        return _Meta(value)
    if isinstance(value, (*_PLAIN, slice, torch.Size)):
        return value
    if type(value) in (tuple, list):
        items = [_template(v) for v in value]
        return tuple(items) if type(value) is tuple else items
    if type(value) is dict:
        return {k: _template(v) for k, v in value.items()}
    raise _Skip       # a named tuple, an object: not reused


def _make(template: Any) -> Any:
    if isinstance(template, _Meta):
        return template.make()
    if isinstance(template, tuple) and not isinstance(template, torch.Size):
        return tuple(_make(v) for v in template)
    if isinstance(template, list):
        return [_make(v) for v in template]
    if isinstance(template, dict):
        return {k: _make(v) for k, v in template.items()}
    return template


def _in_place(node: fx.Node) -> bool:
    if "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) or node.target in _IN_PLACE


class OpMemo:
    """Results of operations by their key (see the module docstring), shared by the interpreters
    of one compile: :func:`op_memo` gives the one of a GraphModule."""

    def __init__(self) -> None:
        self.entries: dict[Any, tuple[Any, Any, Any]] = {}

    def key(self, interpreter: fx.Interpreter, node: fx.Node) -> Any:
        """The key of ``node``'s operation on its arguments in ``interpreter``'s environment, or
        None when it must run."""
        try:
            return self._key(interpreter, node)
        except (_Skip, TypeError, AttributeError, RuntimeError):   # RuntimeError: fx's missing target
            return None

    def _key(self, interpreter: fx.Interpreter, node: fx.Node) -> Any:
        if node.op == "call_function":
            target = node.target
            hash(target)
        elif node.op == "call_method":
            target = node.target
        elif node.op == "call_module":
            module = interpreter.fetch_attr(node.target)
            if not isinstance(module, torch.nn.Module) or not type(module).__module__.startswith("torch.nn") \
                    or next(module.children(), None) is not None or module._forward_hooks \
                    or module._forward_pre_hooks or getattr(module, "inplace", False):
                raise _Skip
            tensors = tuple((name, _key(t)) for name, t in (*module._parameters.items(), *module._buffers.items())
                            if t is not None)
            target = (type(module), module.extra_repr(), module.training, tensors)
        else:
            raise _Skip
        if _in_place(node):
            raise _Skip
        args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
        return node.op, target, _key(args), _key(kwargs)

    def get(self, key: Any) -> tuple[Any, Any, Any] | None:
        """(fresh result, tensor metadata or None, result type) of an earlier equal operation."""
        found = self.entries.get(key) if key is not None else None
        if found is None:
            return None
        template, meta, kind = found
        return _make(template), meta, kind

    def put(self, key: Any, result: Any, meta: Any, kind: Any) -> None:
        if key is None:
            return
        try:
            self.entries[key] = (_template(result), meta, kind)
        except _Skip:
            pass


_MEMOS: "weakref.WeakKeyDictionary[fx.GraphModule, OpMemo]" = weakref.WeakKeyDictionary()


def op_memo(gm: fx.GraphModule) -> OpMemo:
    """The :class:`OpMemo` of ``gm``, alive as long as ``gm`` (one compile's)."""
    memo = _MEMOS.get(gm)
    if memo is None:
        memo = _MEMOS[gm] = OpMemo()
    return memo


class RepeatShapeProp(ShapeProp):
    """:class:`~torch.fx.passes.shape_prop.ShapeProp` that reuses the result of an equal earlier
    operation (see the module docstring). Use on meta tensors only (no ``fake_mode``)."""

    def __init__(self, gm: fx.GraphModule, memo: OpMemo | None = None):
        super().__init__(gm)
        self.memo = memo if memo is not None else op_memo(gm)

    def run_node(self, n: fx.Node) -> Any:
        key = self.memo.key(self, n)
        found = self.memo.get(key)
        if found is not None:
            result, meta, kind = found
            if meta is not None:
                n.meta["tensor_meta"] = meta
            n.meta["type"] = kind
            return result
        result = super().run_node(n)
        self.memo.put(key, result, _found_meta(result, n), n.meta["type"])
        return result


def _found_meta(result: Any, node: fx.Node) -> Any:
    found = []
    fx.node.map_aggregate(result, lambda v: found.append(1) if isinstance(v, torch.Tensor) else None)
    return node.meta.get("tensor_meta") if found else None

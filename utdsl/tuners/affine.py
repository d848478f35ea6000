"""``affine``: per-channel scale and shift, residual-free (SSF, Lian et al., 2022; IA3 with
``shift=false``, Liu et al., 2022). y = h * scale + shift; identity at init by default.

The map runs as :func:`affine`, an autograd function that keeps its *output* for the backward
and rebuilds the input from it (h = (y - shift) / scale): the op after the tuner keeps y anyway,
so an affine costs no activation memory of its own, where ``addcmul`` kept h beside y. A chunked
site (IA3 on k and v of a fused qkv) is one full-width affine whose untuned chunks have scale 1
and shift 0 (:meth:`Affine.chunked_forward`), instead of a split, two maps and a concatenation
that kept the qkv output twice.

Where something keeps the site's input anyway, the affine keeps that and recomputes h in the
backward instead: after an activation or a layer norm (they keep their input), and after an
attention's output projection, whose input is a reshape of ``scaled_dot_product_attention``'s
output, which that op keeps when q, k or v needs a gradient (one projection matmul more in the
backward, a B x N x D activation less per block: SSF then keeps what LoRA keeps, within 1 %).
The recomputation runs under the forward's autocast, so it is bit-equal to the forward's h.

Rebuilding h needs every scale nonzero. That is read from the device once per training forward
for all the affines of a model together (one :class:`ScaleCheck` that the sequential placement
gives them all; the first affine to run in a forward reads every scale in one go), not once per
affine, which on a GPU waited for the device 290 times a ViT-S step; inference and frozen scales
read nothing. (Deciding without any read would need h in the rare zero-scale case, which the
output no longer holds.)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs


class AffineArgs(TunerArgs):
    scale: bool = Field(True, description="learn a per-channel scale")
    shift: bool = Field(True, description="learn a per-channel shift")
    init: Literal["identity", "normal"] = Field(
        "identity", description="identity: scale 1, shift 0; normal: N(1, std) and N(0, std) as SSF's code")
    std: float = Field(0.02, ge=0.0)

    @model_validator(mode="after")
    def _learns_something(self) -> "AffineArgs":
        if not (self.scale or self.shift):
            raise ValueError("affine needs scale=true or shift=true")
        return self


@register
class Affine(Tuner):
    name = "affine"
    Args = AffineArgs
    placements = frozenset({"sequential"})
    mergeable = frozenset({"sequential"})
    residual = False
    summary = "per-channel scale and shift (SSF; IA3 with shift=false); identity at init, mergeable"
    #: after an activation or a layer norm the joint passes that op's input (``forward(h, source, op, params)``)
    recomputes_input = True
    #: whether the backward may keep y and rebuild h from it; the sequential placement clears it
    #: where a later op writes into y in place (timm ResNet's ``ReLU(inplace=True)`` after a norm)
    keep_output = True
    #: shared by the model's affines that keep their output (set by the sequential placement):
    #: reads all their scales from the device at once, once a forward (:class:`ScaleCheck`)
    scale_check: "ScaleCheck | None" = None
    _nonzero = True

    def __init__(self, features: int, args: AffineArgs):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features)) if args.scale else None
        self.shift = nn.Parameter(torch.zeros(features)) if args.shift else None
        if args.init == "normal":
            with torch.no_grad():
                if self.scale is not None:
                    self.scale.normal_(1.0, args.std)
                if self.shift is not None:
                    self.shift.normal_(0.0, args.std)

    @classmethod
    def build(cls, args: AffineArgs, site: SiteInfo) -> "Affine":
        return cls(site.out_features, args)

    @classmethod
    def identity_at_init(cls, args: AffineArgs) -> bool:
        return args.init == "identity" or args.std == 0.0

    def forward(self, h: torch.Tensor, source: torch.Tensor | None = None, op: tuple | None = None,
                params: tuple = ()) -> torch.Tensor:
        """y = h * scale + shift; with ``source``, h is ``op`` of it (see :func:`affine`)."""
        return affine(h, self.scale, self.shift, source, op, params, keep_output=self._may_keep_output())

    def _may_keep_output(self) -> bool:
        """Whether the backward may keep y and rebuild h: ``keep_output``, training with
        gradients, and every scale nonzero (read through :attr:`scale_check`, else here)."""
        if not (self.keep_output and torch.is_grad_enabled()) or self.scale is None \
                or not self.scale.requires_grad or torch.compiler.is_compiling():
            return False
        if self.scale_check is not None:
            return self.scale_check.nonzero(self)
        return bool((self.scale != 0).all())

    @staticmethod
    def chunked_forward(units: list["Affine"], indices: tuple[int, ...], count: int,
                        h: torch.Tensor) -> torch.Tensor:
        """The units on their chunks of ``h``'s last axis at once: one full-width affine whose
        untuned chunks are scaled by 1 and shifted by 0 (exactly h there)."""
        size = h.shape[-1] // count
        first = units[0]
        scale = shift = None
        if first.scale is not None:
            parts = [first.scale.new_ones(size)] * count
            for index, unit in zip(indices, units):
                parts[index] = unit.scale
            scale = torch.cat(parts)
        if first.shift is not None:
            parts = [first.shift.new_zeros(size)] * count
            for index, unit in zip(indices, units):
                parts[index] = unit.shift
            shift = torch.cat(parts)
        keep = [unit._may_keep_output() for unit in units]     # each unit reads its flag once a forward
        return affine(h, scale, shift, keep_output=all(keep))

    def merge_delta(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) to fold into the op's output channels."""
        return self.scale, self.shift


class ScaleCheck:
    """Whether each of a model's affines has every scale nonzero, read from the device in one go:
    one ``all`` over every scale (per device; the per-unit flags only when some scale is zero).
    A read happens at the first :meth:`nonzero` of a forward, known as the first call after
    every unit has asked once, or a unit asking again; each unit runs once a forward."""

    def __init__(self, units: list[Affine]):
        self.units = units
        self._asked: set[int] = set()

    def nonzero(self, unit: Affine) -> bool:
        if not self._asked or id(unit) in self._asked or len(self._asked) >= len(self.units):
            self._read()
        self._asked.add(id(unit))
        return unit._nonzero

    def _read(self) -> None:
        self._asked.clear()
        by_device: dict[torch.device, list[Affine]] = {}
        for unit in self.units:
            if unit.scale is not None:
                by_device.setdefault(unit.scale.device, []).append(unit)
        with torch.no_grad():
            for group in by_device.values():
                if bool((torch.cat([unit.scale.reshape(-1) for unit in group]) != 0).all()):
                    flags = [True] * len(group)
                else:
                    flags = torch.stack([(unit.scale != 0).all() for unit in group]).tolist()
                for unit, flag in zip(group, flags):
                    unit._nonzero = flag

    def __getstate__(self) -> dict:
        return {"units": self.units, "_asked": set()}


def _attention_projection(o: torch.Tensor, dims: tuple, params: tuple, shape: torch.Size) -> torch.Tensor:
    """h = linear(o with its ``dims`` swapped, reshaped to h's leading axes): an attention's output
    projection recomputed from the attention output that ``scaled_dot_product_attention`` keeps."""
    return torch.nn.functional.linear(o.transpose(*dims).reshape(*shape[:-1], -1), *params)


#: operations an affine can recompute its input h from in the backward, because something keeps
#: their input for its own backward: name -> h = f(input, argument, parameters, h's shape)
RECOMPUTE = {
    "gelu": lambda u, approximate, _, __: torch.nn.functional.gelu(u, approximate=approximate),
    "silu": lambda u, _, __, ___: torch.nn.functional.silu(u),
    "relu": lambda u, _, __, ___: torch.relu(u),
    "tanh": lambda u, _, __, ___: torch.tanh(u),
    "sigmoid": lambda u, _, __, ___: torch.sigmoid(u),
    "layer_norm": lambda u, shape_eps, wb, _: torch.nn.functional.layer_norm(u, shape_eps[0], *wb,
                                                                             eps=shape_eps[1]),
    "attention_projection": _attention_projection,
}
#: those whose input is kept by the op before only when it records a backward (attention keeps
#: its output only when q, k or v needs a gradient): without that, the source costs memory
_KEPT_WHEN_RECORDED = {"attention_projection"}


def affine(h: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
           source: torch.Tensor | None = None, op: tuple | None = None, params: tuple = (), *,
           keep_output: bool = True) -> torch.Tensor:
    """h * scale + shift on h's last axis (either term may be None). For the backward it keeps
    ``source`` when h = RECOMPUTE[name](source, argument, params, h.shape) for ``op = (name,
    argument)`` (something keeps ``source`` already), else y rather than h where ``keep_output`` says that is
    exact (every scale nonzero) and nothing writes into y later, and y is no larger
    (:class:`_AffineFunction`)."""
    if scale is None:
        return h + shift
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and scale.requires_grad):
        # the compiler chooses what to keep itself; without a scale gradient nothing keeps h
        return h * scale if shift is None else torch.addcmul(shift, h, scale)
    if source is not None and op[0] in _KEPT_WHEN_RECORDED and not source.requires_grad:
        source = None
    return _AffineFunction.apply(h, scale, shift, source, op, tuple(params), keep_output)


class _AffineFunction(torch.autograd.Function):
    """y = h * scale (+ shift). Backward: dh = g * scale, dscale = sum(g * h), dshift = sum(g),
    sums over every axis but the last. For dscale, h is recomputed from ``source`` when given,
    else rebuilt as (y - shift) / scale when ``keep_output`` (the caller knows every scale is
    nonzero) and y has h's dtype, else kept, as ``addcmul`` did. Nothing here reads the device."""

    @staticmethod
    def forward(ctx, h, scale, shift, source, op, params, keep_output):
        y = h * scale if shift is None else torch.addcmul(shift, h, scale)
        ctx.mode, ctx.op, ctx.h_dtype, ctx.has_shift = "none", op, h.dtype, shift is not None
        ctx.h_shape, ctx.device_type = h.shape, h.device.type
        ctx.autocast = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        ctx.params = params     # the op's parameters (weights: no activation memory)
        if not scale.requires_grad:
            ctx.save_for_backward(None, scale, None)
            return y
        if source is not None:
            ctx.mode = "source"
            ctx.save_for_backward(source, scale, None)
        elif keep_output and y.dtype == h.dtype:
            ctx.mode = "output"
            ctx.save_for_backward(y, scale, shift)
        else:
            ctx.mode = "input"
            ctx.save_for_backward(h, scale, None)
        return y

    @staticmethod
    def backward(ctx, grad):
        value, scale, shift = ctx.saved_tensors
        grad_h = grad_scale = grad_shift = None
        leading = tuple(range(grad.dim() - 1))
        if ctx.needs_input_grad[0]:
            grad_h = (grad * scale).to(ctx.h_dtype)
        if ctx.needs_input_grad[1]:
            if ctx.mode == "source":
                name, argument = ctx.op
                with torch.autocast(ctx.device_type, dtype=ctx.autocast, enabled=ctx.autocast is not None):
                    h = RECOMPUTE[name](value, argument, ctx.params, ctx.h_shape)  # as the forward ran it
            elif ctx.mode == "output":
                h = (value - shift) / scale if shift is not None else value / scale
            else:
                h = value
            grad_scale = (grad * h).sum(leading) if leading else grad * h
        if ctx.has_shift and ctx.needs_input_grad[2]:
            grad_shift = grad.sum(leading) if leading else grad
        return grad_h, grad_scale, grad_shift, None, None, None, None

"""Channel layout of the values at a site's boundary: which axis holds the channels (-1 for
tokens and channels-last maps, 1 for NCHW maps).

The layout is read from what the value is, never from its sizes alone: the site's own module
kind, then the shapes of a second shape propagation at another input size (:func:`probe_layouts`:
the axis whose size does not follow the image is the channel axis), then the operations that
produce or consume the value (a conv, a batch norm, timm's ``LayerNorm2d`` take NCHW; a linear, a
layer norm take channels last). Only when none of these speak does the shape decide.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["channel_axis", "probe_layouts"]


def channel_axis(node: fx.Node, module: torch.nn.Module | None = None, peers: tuple[fx.Node, ...] = ()) -> int:
    """Where the channels of the value ``node`` are: -1 (tokens, channels-last maps) or another
    axis (1 for NCHW maps). Decided, first that applies, by: the site ``module`` when it is a leaf
    of a known layout (a conv: 1; a linear or layer norm: -1); the only non-batch axis whose size
    did not change when :func:`probe_layouts` ran the model at another input size; the nearest
    layout-revealing operation that produces or consumes the value or one of its ``peers`` (values
    of the same shape at the other end of the site); the value's shape (a square spatial size) as
    a last resort."""
    shape = tuple(node.meta["tensor_meta"].shape)
    if len(shape) < 3:
        return -1
    axis = _module_layout(module)
    if axis is None:
        axis = _probed_axis(shape, node.meta.get(_ALT_SHAPE))
    if axis is None:
        axis = _neighbour_layout([node, *(p for p in peers if _shape_or_none(p) == shape)])
    if axis is None:
        axis = 1 if len(shape) == 4 and shape[2] == shape[3] and shape[1] != shape[2] else -1
    return -1 if axis in (-1, len(shape) - 1) else axis


_ALT_SHAPE = "utdsl_alt_shape"
_LAST_MODULES = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.RMSNorm)
_FIRST_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                  torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.pooling._AvgPoolNd,
                  torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AdaptiveAvgPoolNd,
                  torch.nn.modules.pooling._AdaptiveMaxPoolNd)
_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.instance_norm, F.avg_pool2d,
                    F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
_LAST_FUNCTIONS = {F.linear, F.layer_norm}


def _module_layout(module: torch.nn.Module | type | None) -> int | None:
    """1 for a module (or class) that works on channels-first values, -1 for channels-last, None
    for a container or a kind that does not say. timm's ``LayerNorm2d`` is an ``nn.LayerNorm`` on
    NCHW, so a ``...2d`` name wins over the class."""
    kind = module if isinstance(module, type) else type(module)
    if not isinstance(kind, type) or not issubclass(kind, torch.nn.Module):
        return None
    if kind.__name__.endswith(("Norm2d", "Norm1d", "Act2d", "Pool2d", "Conv2d")) or issubclass(kind, _FIRST_MODULES):
        return 1
    return -1 if issubclass(kind, _LAST_MODULES) else None


def _probed_axis(shape: tuple[int, ...], alt: tuple[int, ...] | None) -> int | None:
    if alt is None or len(alt) != len(shape):
        return None
    fixed = [axis for axis in range(1, len(shape)) if shape[axis] == alt[axis]]
    return fixed[0] if len(fixed) == 1 else None


def _op_layout(node: fx.Node, value: fx.Node) -> int | None:
    """The layout an operation imposes on ``value`` (its output, or its first argument)."""
    if node is not value and (not node.args or node.args[0] is not value):
        return None
    if node.op == "call_function":
        return 1 if node.target in _FIRST_FUNCTIONS else -1 if node.target in _LAST_FUNCTIONS else None
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return _module_layout(module)
    if node is not value:  # a traced-through 2d norm (timm's LayerNorm2d) starts with a permute
        entered = [kind for path, kind in (node.meta.get("nn_module_stack") or {}).values()
                   if path not in {p for p, _ in (value.meta.get("nn_module_stack") or {}).values()}]
        for kind in entered:
            if isinstance(kind, type) and kind.__name__.endswith(("Norm2d", "Act2d")):
                return 1
    return None


_SHAPE_CHANGING = {"permute", "transpose", "reshape", "view", "flatten", "unflatten", "movedim", "swapaxes"}


def _moves_axes(node: fx.Node) -> bool:
    """An operation that may move axes while keeping the shape (a permute of an 8x8x8 map)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _SHAPE_CHANGING


def _shape_or_none(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _neighbour_layout(nodes: list[fx.Node], limit: int = 8) -> int | None:
    """The layout of the nearest operation producing or consuming the values ``nodes`` (all of
    one shape), looking through shape-keeping elementwise operations (activations, residual adds,
    dropout)."""
    shape = _shape_or_none(nodes[0])
    frontier, seen = list(nodes), set(nodes)
    while frontier and len(seen) < 4 * limit:
        value = frontier.pop(0)
        for other in (value, *value.users):
            axis = _op_layout(other, value)
            if axis is not None:
                return axis
        for other in (*value.all_input_nodes, *value.users):
            if (other not in seen and _shape_or_none(other) == shape
                    and not _moves_axes(other) and not (_moves_axes(value) and other in value.all_input_nodes)):
                seen.add(other)
                frontier.append(other)
    return None


def probe_layouts(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Record on each node (``meta['utdsl_alt_shape']``) its value's shape with the image input's
    height and width doubled, for :func:`channel_axis`: the axis whose size stays is the channel
    axis. Models that take one size only (a ViT without ``dynamic_img_size``) record nothing; the
    shapes of ``example_input`` already on the nodes are kept."""
    for node in gm.graph.nodes:
        node.meta.pop(_ALT_SHAPE, None)
    if example_input.dim() != 4:
        return
    from .plan import propagate_shapes

    kept = {node: node.meta.get("tensor_meta") for node in gm.graph.nodes}
    b, c, h, w = example_input.shape
    alt = torch.empty(b, c, 2 * h, 2 * w, dtype=example_input.dtype, device=example_input.device)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before raising
            propagate_shapes(gm, alt)
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if hasattr(meta, "shape"):
                node.meta[_ALT_SHAPE] = tuple(meta.shape)
    except Exception:  # noqa: BLE001 - a model that rejects the size: other clues decide
        pass
    finally:
        for node, meta in kept.items():
            if meta is None:
                node.meta.pop("tensor_meta", None)
            else:
                node.meta["tensor_meta"] = meta

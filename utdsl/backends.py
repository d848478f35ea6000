"""Choosing how to trace a model, and making backbones that are not timm's traceable.

Two routes give the graph that every later stage reads (targets are the model's own qualified
names, ``node.meta['nn_module_stack']`` values are ``(path, type)`` with the paths of
``model.named_modules()``, base parameter names kept):

- fx symbolic tracing (:class:`~utdsl.trace.BackboneTracer`), for timm, torchvision and plain
  PyTorch models. ``torch.nn.MultiheadAttention`` is a torch.nn leaf that fx does not trace into;
  a supported one (self-attention, packed ``in_proj_weight``, no ``bias_k``/``add_zero_attn``, no
  mask at the call) is traced through :func:`multihead_attention_forward`, which computes what
  ``F.multi_head_attention_forward`` computes with the same parameters, the in-projection as one
  linear inside the view module ``in_proj`` (added by :func:`prepare`; it owns no parameters, so
  state dicts are unchanged) and the attention as ``scaled_dot_product_attention``. So
  ``self_attention.in_proj{q, v} -> parallel lowrank`` is LoRA on torchvision's ViT, and
  ``prefix`` finds the attention.
- ``torch.export`` (non-strict, batch dimension dynamic), for Hugging Face ``transformers``
  models, which fx cannot trace (keyword-only inputs, ``**kwargs``, shape checks in Python). The
  exported ATen graph is converted to fx conventions (:func:`export_graph`): ``aten.linear`` is
  ``F.linear``, ``aten.scaled_dot_product_attention`` is ``F.scaled_dot_product_attention``, and
  so on, so merge and prefix read it as a traced graph. The compiled model returns what the model
  returns (a ``ModelOutput``). Export fixes every size but the batch, so a ``prompt`` (more tokens
  than traced) is refused on such a graph with a SiteError (:func:`fixed_token_count`).

:func:`prepare` also records the prefix-token count (``num_prefix_tokens``: class and register
tokens) of the families it knows, which ``prompt`` reads.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

__all__ = ["prepare", "InProjection", "multihead_attention_forward", "traceable_forward",
           "uses_export", "export_graph", "finish_module", "fixed_token_count", "example_input_for"]


class InProjection(nn.Module):
    """The packed q/k/v in-projection of a ``MultiheadAttention`` as a selectable module. It owns
    no parameters: it is called with the attention's ``in_proj_weight`` and ``in_proj_bias``."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def _supported_mha(m: nn.Module) -> bool:
    return (isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.in_proj_weight is not None
            and m.bias_k is None and m.bias_v is None and not m.add_zero_attn)


def prepare(model: nn.Module) -> nn.Module:
    """Make ``model`` (in place) ready for :func:`~utdsl.trace.trace_graph`: an ``in_proj`` view
    on every supported ``MultiheadAttention``, and ``num_prefix_tokens`` where the family is known
    and the model does not say. Returns ``model``."""
    for m in model.modules():
        if _supported_mha(m) and not isinstance(getattr(m, "in_proj", None), InProjection):
            m.in_proj = InProjection()
    if not hasattr(model, "num_prefix_tokens"):
        count = _prefix_tokens(model)
        if count is not None:
            model.num_prefix_tokens = count
    return model


def _prefix_tokens(model: nn.Module) -> int | None:
    try:
        from torchvision.models import VisionTransformer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        VisionTransformer = ()
    if isinstance(model, VisionTransformer):
        return 1
    config = getattr(model, "config", None)
    if uses_export(model) and config is not None:
        config = getattr(config, "vision_config", config)
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return None


def multihead_attention_forward(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                                need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``mha(query, key, value, ...)`` for a batched self-attention without masks, as traceable
    operations: ``F.multi_head_attention_forward``'s steps with the in-projection one linear and,
    when no weights are asked for, the attention one ``scaled_dot_product_attention``."""
    if mha.batch_first:
        query = query.transpose(1, 0)
    length, batch, embed = query.shape[0], query.shape[1], mha.embed_dim
    heads, head_dim = mha.num_heads, mha.head_dim
    in_proj = getattr(mha, "in_proj", None)
    if isinstance(in_proj, InProjection):
        proj = in_proj(query, mha.in_proj_weight, mha.in_proj_bias)
    else:
        proj = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
    proj = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (t.view(length, batch * heads, head_dim).transpose(0, 1) for t in (proj[0], proj[1], proj[2]))
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = torch.bmm(q * (1.0 / head_dim) ** 0.5, k.transpose(-2, -1))
        attn = torch.softmax(scores, dim=-1)
        weights = attn
        if dropout > 0.0:
            attn = F.dropout(attn, p=dropout)
        out = torch.bmm(attn, v).transpose(0, 1).contiguous().view(length * batch, embed)
        weights = weights.view(batch, heads, length, length)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        q, k, v = (t.view(batch, heads, length, head_dim) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, None, dropout, is_causal)
        out = out.permute(2, 0, 1, 3).contiguous().view(batch * length, embed)
    out = mha.out_proj(out).view(length, batch, embed)
    if mha.batch_first:
        out = out.transpose(1, 0)
    return out, weights


def traceable_forward(module: nn.Module, args: tuple, kwargs: dict):
    """A forward to trace ``module`` through in place of its own, or None to keep fx's choice."""
    if not _supported_mha(module):
        return None
    call = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                     "average_attn_weights", "is_causal"), args)) | dict(kwargs)
    same = len(args) >= 1 and all(call.get(n) is call.get("query") for n in ("key", "value"))
    plain = all(call.get(n) is None for n in ("key_padding_mask", "attn_mask")) \
        and call.get("is_causal", False) is False and isinstance(call.get("need_weights", True), bool)
    if not same or not plain:
        return None

    def forward(*a, **kw):
        return multihead_attention_forward(module, *a, **kw)

    return forward


def uses_export(model: nn.Module) -> bool:
    """Whether ``model`` is traced by ``torch.export`` (Hugging Face ``transformers`` models)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def example_input_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random ``pixel_values`` batch of the model's configured size (``config.image_size``)."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", config)
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    channels = getattr(config, "num_channels", 3)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return torch.randn(batch, channels, *size, device=device)


def _aten_to_functional() -> dict:
    aten = torch.ops.aten
    return {
        aten.linear.default: (F.linear, 3),
        aten.conv1d.default: (F.conv1d, 7), aten.conv2d.default: (F.conv2d, 7),
        aten.layer_norm.default: (F.layer_norm, 5),
        aten.scaled_dot_product_attention.default: (F.scaled_dot_product_attention, 6),
        aten.matmul.default: (torch.matmul, 2), aten.bmm.default: (torch.bmm, 2),
        aten.softmax.int: (torch.softmax, 3),
    }


def export_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.Graph:
    """``model`` exported by ``torch.export`` (non-strict, dynamic batch) in its current mode, as
    a graph in fx conventions; constants export lifts out are registered on ``model`` as
    non-persistent buffers so the graph's targets all resolve on it."""
    x = example_input if example_input is not None else example_input_for(model)
    if x.shape[0] < 2:  # export specializes a batch of 1
        x = x.expand(2, *x.shape[1:])
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                      strict=False)
    except Exception as error:  # export raises many kinds from model code
        raise ModelError(f"{type(model).__name__} cannot be exported by torch.export: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                         hint="utdsl traces Hugging Face models with torch.export; pass pixel_values "
                              "as the first argument") from error
    exported = program.module()
    graph = exported.graph
    mapping = _aten_to_functional()
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    next(iter(graph.nodes)).prepend(placeholder)   # inputs first, as in a traced graph
    device = None
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
            if device is None:  # tensors made in forward follow the input (meta when sizing)
                with graph.inserting_after(placeholder):
                    device = graph.call_function(getattr, (placeholder, "device"))
            node.update_kwarg("device", device)
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: v for k, v in stack.items()
                                            if not v[0].startswith("_empty_nn_module_stack")}
        if node.op == "call_function" and node.target in mapping:
            function, arity = mapping[node.target]
            node.target = function
            node.args = node.args[:arity]
        if node.op == "get_attr" and not has_attr_path(model, node.target):
            owner, _, name = node.target.rpartition(".")
            value = exported.get_submodule(owner) if owner else exported
            target = model.get_submodule(owner) if owner and has_attr_path(model, owner) else model
            target.register_buffer(name, getattr(value, name), persistent=False)
    graph._utdsl_specs = (exported._in_spec, exported._out_spec)
    return graph


def has_attr_path(model: nn.Module, target: str) -> bool:
    """Whether the dotted ``target`` resolves to an attribute of ``model``."""
    for item in target.split("."):
        if not hasattr(model, item):
            return False
        model = getattr(model, item)
    return True


def finish_module(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Give ``gm`` what an exported ``graph``'s generated code reads (its pytree specs)."""
    specs = getattr(graph, "_utdsl_specs", None)
    if specs is not None:
        gm._in_spec, gm._out_spec = specs
        gm.meta["utdsl_backend"] = "export"


def fixed_token_count(gm: nn.Module) -> bool:
    """Whether ``gm`` was traced with every size but the batch fixed (torch.export)."""
    return getattr(gm, "meta", {}).get("utdsl_backend") == "export"

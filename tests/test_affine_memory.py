"""The affine tuner's autograd function (:func:`utdsl.tuners.affine.affine`) against autograd of
the plain formula ``addcmul(shift, h, scale)`` (what the tuner ran before): the same gradients (within 1e-6) in every mode it keeps
for the backward (the output, the op's input, h itself), on chunked IA3, where a later op writes
in place, with a zero scale; less saved memory; one device read a forward for all affines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import utdsl
from utdsl.tuners import affine as affine_module
from utdsl.tuners.affine import Affine, AffineArgs, ScaleCheck, affine

from .conftest import tiny_vit

TOL = dict(rtol=1e-6, atol=1e-6)


def _leaves(*shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g, dtype=torch.float64).float()
    scale = (1.0 + 0.5 * torch.randn(shape[-1], generator=g)).requires_grad_(True)
    shift = (0.1 * torch.randn(shape[-1], generator=g)).requires_grad_(True)
    return h, scale, shift, torch.randn(*shape, generator=g)


@pytest.mark.parametrize("keep_output", [True, False])
@pytest.mark.parametrize("with_shift", [True, False])
def test_function_matches_plain_formula(keep_output, with_shift):
    h, scale, shift, up = _leaves(4, 7, 12)
    leaves = (scale, shift) if with_shift else (scale,)

    def run(fn):
        x = h.detach().clone().requires_grad_(True)
        y = fn(x)
        return y.detach(), torch.autograd.grad(y, (x, *leaves), up)

    if with_shift:
        want_y, want = run(lambda x: torch.addcmul(shift, x, scale))
        got_y, got = run(lambda x: affine(x, scale, shift, keep_output=keep_output))
    else:
        want_y, want = run(lambda x: x * scale)
        got_y, got = run(lambda x: affine(x, scale, None, keep_output=keep_output))
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("op", ["gelu", "layer_norm"])
def test_recomputed_input_matches(op):
    u, scale, shift, up = _leaves(3, 5, 16, seed=1)
    w, b = torch.randn(16), torch.randn(16)
    make = {"gelu": (lambda x: F.gelu(x), ("gelu", "none"), ()),
            "layer_norm": (lambda x: F.layer_norm(x, (16,), w, b, 1e-6), ("layer_norm", ((16,), 1e-6)), (w, b))}
    f, spec, params = make[op]

    def run(fn):
        source = u.detach().clone().requires_grad_(True)
        y = fn(source)
        return y.detach(), torch.autograd.grad(y, (source, scale, shift), up)

    want_y, want = run(lambda x: torch.addcmul(shift, f(x), scale))
    got_y, got = run(lambda x: affine(f(x), scale, shift, x, spec, params))
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_zero_scale_keeps_h_and_stays_exact():
    unit = Affine(8, AffineArgs())
    with torch.no_grad():
        unit.scale.normal_(1.0, 0.3)
        unit.scale[3] = 0.0
    h, _, _, up = _leaves(2, 5, 8, seed=2)
    h = h.requires_grad_(True)
    got = torch.autograd.grad(unit(h), (h, unit.scale, unit.shift), up)
    want = torch.autograd.grad(torch.addcmul(unit.shift, h, unit.scale), (h, unit.scale, unit.shift), up)
    assert all(torch.isfinite(g).all() for g in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def _plain_affine(monkeypatch):
    """Route every affine through autograd of the plain formula (the reference)."""
    class Plain:
        @staticmethod
        def apply(h, scale, shift, source, op, params, keep_output):
            return h * scale if shift is None else torch.addcmul(shift, h, scale)

    monkeypatch.setattr(affine_module, "_AffineFunction", Plain)


def _model_grads(model, images):
    model.train()
    model.zero_grad(set_to_none=True)
    model(images).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _randomize(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("tuners."):
                p.copy_((1.0 if name.endswith("scale") else 0.0) + 0.2 * torch.randn_like(p))


@pytest.mark.parametrize("spec", ["ssf", "ia3"])
def test_compiled_gradients_match_plain(spec, monkeypatch, images):
    model = utdsl.compile(spec, tiny_vit(), images)
    _randomize(model)
    got = _model_grads(model, images)
    _plain_affine(monkeypatch)
    want = _model_grads(model, images)
    assert set(got) == set(want) and any(n.endswith("scale") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


class _InPlaceAfter(nn.Module):
    """An affine site followed by an in-place ReLU (timm ResNet's norm -> act(inplace=True))."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_in_place_user_keeps_h(monkeypatch):
    spec = 'spec t "affine before an in-place op"\nfc -> sequential affine()\n'
    model = utdsl.compile(spec, _InPlaceAfter(), torch.randn(2, 6))
    (unit,) = [m for m in model.modules() if isinstance(m, Affine)]
    assert unit.keep_output is False and unit.scale_check is None
    _randomize(model)
    x = torch.randn(4, 6)
    got = _model_grads(model, x)
    _plain_affine(monkeypatch)
    want = _model_grads(model, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_chunked_ia3_is_one_full_width_affine(images):
    model = utdsl.compile("ia3", tiny_vit(), images)
    _randomize(model)
    joint = model.get_submodule(model.meta["utdsl"].plan.insertions[0].module_name)
    h = torch.randn(2, 5, 3 * 192)
    units = list(joint.units.values())
    split = list(h.split(192, -1))
    for index, unit in zip(joint.chunk_indices, units):
        split[index] = split[index] * unit.scale
    torch.testing.assert_close(joint(h), torch.cat(split, -1), rtol=0, atol=0)


def _saved_bytes(model, images) -> int:
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), images]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in frozen:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("spec", ["ssf", "ia3"])
def test_saves_less_than_plain_formula(spec, monkeypatch, images):
    model = utdsl.compile(spec, tiny_vit(), images).train()
    mine = _saved_bytes(model, images)
    _plain_affine(monkeypatch)
    assert mine < 0.8 * _saved_bytes(model, images)


def test_one_device_read_a_forward(monkeypatch, images):
    model = utdsl.compile("ssf", tiny_vit(), images).train()
    checks = {id(m.scale_check) for m in model.modules() if isinstance(m, Affine)}
    assert len(checks) == 1 and None not in checks
    reads = []
    original = ScaleCheck._read
    monkeypatch.setattr(ScaleCheck, "_read", lambda self: (reads.append(1), original(self))[1])
    for _ in range(3):
        model(images).sum().backward()
    assert len(reads) == 3
    with torch.no_grad():
        model(images)
    assert len(reads) == 3
    # a zero scale appearing between forwards is seen at the next one
    unit = next(m for m in model.modules() if isinstance(m, Affine))
    with torch.no_grad():
        unit.scale[0] = 0.0
    model(images).sum().backward()
    assert unit._nonzero is False and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                          if p.grad is not None)


def _attention_output(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g).requires_grad_(True) for _ in range(3))
    return F.scaled_dot_product_attention(q, k, v), (q, k, v)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_projection_recomputed_from_attention_output(precision):
    """An affine after an attention's output projection keeps the attention output (which
    ``scaled_dot_product_attention`` keeps anyway) and recomputes the projection in the backward,
    under the same autocast as the forward: the same values and gradients as the plain formula."""
    proj = nn.Linear(12, 12)
    scale = (1.0 + 0.5 * torch.randn(12)).requires_grad_(True)
    shift = (0.1 * torch.randn(12)).requires_grad_(True)
    params = (proj.weight, proj.bias)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            o, qkv = _attention_output(seed=4)
            h = proj(o.transpose(1, 2).reshape(2, 5, 12))
            y = fn(h, o)
        return y.detach(), torch.autograd.grad(y.float().square().sum(), (*qkv, scale, shift))

    want_y, want = run(lambda h, o: torch.addcmul(shift, h, scale))
    got_y, got = run(lambda h, o: affine(h, scale, shift, o, ("attention_projection", (1, 2)), params))
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def _proj_units(model):
    return [m for name, m in model.named_modules() if name.endswith("attn.proj.sequential_affine")]


def test_ssf_projection_affines_keep_the_attention_output(images):
    model = utdsl.compile("ssf", tiny_vit(), images)
    joints = _proj_units(model)
    assert len(joints) == 2 and all(j.op == ("attention_projection", (1, 2)) for j in joints)
    nodes = [n for n in model.graph.nodes if n.op == "call_module" and n.target.endswith("attn.proj.sequential_affine")]
    assert all(n.kwargs["source"].target is F.scaled_dot_product_attention for n in nodes)


def test_ssf_saves_at_most_lora_plus_five_percent(images):
    """Issue 12's target on a small ViT: SSF's saved activations <= 1.05x LoRA's."""
    batch = torch.randn(4, 3, 32, 32)
    ssf = utdsl.compile("ssf", tiny_vit(), images).train()
    lora = utdsl.compile("lora", tiny_vit(), images).train()
    assert _saved_bytes(ssf, batch) <= 1.05 * _saved_bytes(lora, batch)


def test_projection_affine_recomputes_only_where_attention_keeps_its_output(images, monkeypatch):
    """The first block's attention needs no gradient (nothing trained before it) and keeps
    nothing: its affine keeps its output. The second's does (the first affine is upstream), so
    that affine recomputes from the attention output. Both stay exact."""
    spec = 'spec p "affine after the output projection only"\nattn.proj -> sequential affine()\n'
    model = utdsl.compile(spec, tiny_vit(), images).train()
    _randomize(model)
    modes = []
    original = affine_module._AffineFunction.forward

    def spy(ctx, *args):
        out = original(ctx, *args)
        modes.append(ctx.mode)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(affine_module._AffineFunction, "forward", staticmethod(spy))
        got = _model_grads(model, images)
    assert modes == ["output", "source"]
    _plain_affine(monkeypatch)
    want = _model_grads(model, images)
    assert set(got) == set(want) and len(want) == 4
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


@pytest.mark.parametrize("name, options, size", [
    ("eva02_tiny_patch14_224", dict(depth=2), 56),                               # rotary, SwiGLU, split q/k/v
    ("beit_base_patch16_224", dict(depth=2, embed_dim=96, num_heads=2), 32),     # relative position bias
])
def test_ssf_recomputes_projections_exactly_on_other_families(name, options, size, monkeypatch):
    import timm

    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=5, img_size=size, **options).train()
    x = torch.randn(2, 3, size, size)
    model = utdsl.compile("ssf", base, x)
    sources = [n.kwargs["source"] for n in model.graph.nodes if n.op == "call_module" and "source" in n.kwargs]
    assert sum(s.target is F.scaled_dot_product_attention for s in sources) == 2
    _randomize(model)
    got = _model_grads(model, x)
    _plain_affine(monkeypatch)
    want = _model_grads(model, x)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)

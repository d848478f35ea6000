"""Modules used functionally: timm's EVA-02, BEiT and SwinV2 attention run
``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`` instead of calling ``self.qkv``.
A tuner on ``attn.qkv`` attaches to that call; compiled models match hand-written references."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import utdsl
from utdsl.trace import module_path_of, region, trace

FAMILIES = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),
    "beit": ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=2), 32),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                               window_size=4), 64),
}

#: tuners left in the graph by merge: IA3's scale on a gated MLP's activation (the other factor of
#: its product is a chunk of the fused fc1, not an op of its own), SSF's shift on qkv (the k rows'
#: bias is timm's unsaved k_bias buffer) and on the Identity ``norm`` of avg-pool models (no weight
#: before it; the fc_norm layer norm after it cannot absorb it)
LEFT_AFTER_MERGE = {
    ("eva02", "lora"): 0, ("eva02", "ia3"): 2, ("eva02", "ssf"): 3,
    ("beit", "lora"): 0, ("beit", "ia3"): 0, ("beit", "ssf"): 3,
    ("swinv2", "lora"): 0, ("swinv2", "ia3"): 0, ("swinv2", "ssf"): 2,
}


def build(family: str) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=5, **kwargs).eval()
    # frozen as in the compiled model: SDPA picks its kernel by whether the mask requires grad
    # (BEiT's relative-position bias), and the kernels differ in the last bits
    base.requires_grad_(False)
    return base, torch.randn(2, 3, size, size)


def randomize(tuned: nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05).add_(1.0 if p.dim() == 1 else 0.0)


def qkv_sites(base: nn.Module) -> list[str]:
    return [n for n, m in base.named_modules() if n.endswith("attn.qkv")]


def _qkv_overrides(base: nn.Module, tuned: nn.Module, site: str) -> dict[str, torch.Tensor]:
    """The qkv weight and bias pieces the tuners at ``site`` amount to, in plan order:
    W + ΔW for a lowrank, S W and s * b + t for an affine."""
    attn = site.rsplit(".", 1)[0]
    weight = base.get_parameter(f"{site}.weight")
    bias = [getattr(base.get_submodule(attn), f"{c}_bias") for c in "qkv"]
    size = weight.shape[0] // 3
    for ins in tuned.meta["utdsl"].plan.insertions:
        if ins.site != site:
            continue
        joint = tuned.get_submodule(ins.module_name)
        labels = [c for c in "qkv" if c in joint.units] if ins.chunks else None
        if ins.tuner == "lowrank":
            delta = [torch.zeros(size, weight.shape[1]) for _ in range(3)]
            for c in labels:
                u = joint.units[c]
                delta["qkv".index(c)] = u.scaling * u.up.weight @ u.down.weight
            weight = weight + torch.cat(delta)
        else:
            units = {c: joint.units[c] for c in labels} if labels else None
            scales, new_bias = [], []
            for i, c in enumerate("qkv"):
                unit = units.get(c) if units else joint.units["full"]
                rows = slice(0, size) if units else slice(i * size, (i + 1) * size)
                s = torch.ones(size) if unit is None or unit.scale is None else unit.scale[rows]
                t = torch.zeros(size) if unit is None or unit.shift is None else unit.shift[rows]
                scales.append(s)
                new_bias.append(s * bias[i] + t)
            weight, bias = torch.cat(scales)[:, None] * weight, new_bias
    return {f"{site}.weight": weight, **{f"{attn}.{c}_bias": b for c, b in zip("qkv", bias)}}


def reference(base: nn.Module, tuned: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base model with every qkv tuner written into its weights and every other affine applied
    by a forward hook on its module."""
    overrides = {n: p for n, p in tuned.named_parameters() if p.requires_grad and not n.startswith("tuners.")}
    handles = []
    for site in qkv_sites(base):
        overrides |= _qkv_overrides(base, tuned, site)
    for ins in tuned.meta["utdsl"].plan.insertions:
        if ins.site.endswith("attn.qkv"):
            continue
        assert ins.tuner == "affine" and ins.chunks is None
        unit = tuned.get_submodule(ins.module_name).units["full"]

        def hook(module, args, out, unit=unit):
            out = out * unit.scale if unit.scale is not None else out
            return out + unit.shift if unit.shift is not None else out
        handles.append(base.get_submodule(ins.site).register_forward_hook(hook))
    try:
        return functional_call(base, overrides, (x,))
    finally:
        for handle in handles:
            handle.remove()


def expected_tuner_params(family: str, spec: str, base: nn.Module) -> int:
    """Tuner sizes from the base's shapes, by hand."""
    qkv = [base.get_submodule(s).weight.shape for s in qkv_sites(base)]
    if spec == "lora":
        return sum(2 * (8 * c + 8 * (out // 3)) for out, c in qkv)
    hidden = {n: m.weight.shape[0] for n, m in base.named_modules() if n.endswith("mlp.fc1")}
    if spec == "ia3":
        act = [h // 2 if family == "eva02" else h for h in hidden.values()]  # eva02's fc1 is gate|x
        return sum(2 * out // 3 for out, _ in qkv) + sum(act)
    widths = [out for out, _ in qkv] + list(hidden.values())
    for suffix in ("attn.proj", "mlp.fc2", "norm1", "norm2"):
        widths += [m.weight.shape[0] for n, m in base.named_modules() if n.endswith(suffix)]
    patch_and_norm = 2 * base.patch_embed.proj.out_channels if family != "swinv2" else \
        base.patch_embed.proj.out_channels + base.num_features
    return 2 * (sum(widths) + patch_and_norm)


def test_region_of_a_functional_weight_is_its_linear_call():
    base, _ = build("beit")
    graph = trace(base).graph
    found = region(graph, "blocks.0.attn.qkv")
    (call,) = found.nodes
    assert call.target is F.linear and found.calls == 1
    assert found.outputs == [call] and found.inputs == [call.args[0]]  # the bias is part of the op
    assert module_path_of(call.args[0])[-1] == "blocks.0.norm1"
    proj = region(graph, "blocks.0.attn.proj")  # an ordinary call: unchanged
    assert [n.target for n in proj.nodes] == ["blocks.0.attn.proj"] and proj.calls == 0
    assert region(graph, "blocks.0.attn.k_bias") is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("spec", ["lora", "ia3", "ssf"])
def test_library_spec_equals_hand_written_reference(family, spec):
    base, x = build(family)
    tuned = utdsl.compile(spec, base, x)
    assert any(i.site.endswith("attn.qkv") for i in tuned.meta["utdsl"].plan.insertions)
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)  # identity at init
    plan = tuned.meta["utdsl"].plan
    assert plan.tuner_params == expected_tuner_params(family, spec, base)
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("head"))
    assert sum(p.numel() for p in trainable.values()) == plan.tuner_params + head == plan.trainable_params

    randomize(tuned)
    tuned(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = None
    want = reference(base, tuned, x)
    torch.testing.assert_close(tuned(x), want, rtol=0, atol=1e-5)
    want.square().sum().backward()
    for name, p in trainable.items():  # the reference reads the tuned model's tuners and head
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("spec", ["lora", "ia3", "ssf"])
def test_merge_folds_into_the_functional_weight(family, spec):
    base, x = build(family)
    tuned = utdsl.compile(spec, base, x)
    randomize(tuned)
    merged = utdsl.merge(tuned)
    torch.testing.assert_close(merged(x), tuned(x), rtol=0, atol=1e-5)
    left = [n for n in merged.graph.nodes if n.op == "call_module" and n.target.startswith("tuners.")]
    assert len(left) == LEFT_AFTER_MERGE[family, spec]


def test_affine_on_functional_qkv_folds_into_q_and_v_bias_or_stays():
    base, x = build("beit")
    tuned = utdsl.compile("attn.qkv{q, v} -> sequential affine()", base, x)
    randomize(tuned)
    merged = utdsl.merge(tuned)
    torch.testing.assert_close(merged(x), tuned(x), rtol=0, atol=1e-5)
    assert not [n for n in merged.graph.nodes if n.op == "call_module" and n.target.startswith("tuners.")]
    attn, after = tuned.get_submodule("blocks.0.attn"), merged.get_submodule("blocks.0.attn")
    units = tuned.get_submodule("tuners.blocks.0.attn.qkv.sequential_affine").units
    size = attn.q_bias.shape[0]
    for c, bias in (("q", attn.q_bias), ("v", attn.v_bias)):
        torch.testing.assert_close(getattr(after, f"{c}_bias"), bias * units[c].scale + units[c].shift,
                                   rtol=0, atol=1e-6)
    rows = slice(2 * size, 3 * size)
    torch.testing.assert_close(after.qkv.weight[rows], attn.qkv.weight[rows] * units["v"].scale[:, None],
                               rtol=0, atol=1e-6)
    assert torch.equal(after.k_bias, attn.k_bias)  # timm's zeros, not saved in the state dict

    shifted = utdsl.compile("attn.qkv -> sequential affine()", base, x)
    randomize(shifted)
    merged = utdsl.merge(shifted)  # k's shift has no parameter to go into: left in the graph
    torch.testing.assert_close(merged(x), shifted(x), rtol=0, atol=1e-5)
    assert len([n for n in merged.graph.nodes if n.op == "call_module" and n.target.startswith("tuners.")]) == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_round_trip(family, tmp_path):
    base, x = build(family)
    tuned = utdsl.compile("lora", base, x)
    randomize(tuned)
    path = utdsl.save_tuners(tuned, tmp_path / "lora.safetensors")
    fresh = utdsl.compile("lora", base, x)
    assert not torch.equal(fresh(x), tuned(x))
    utdsl.load_tuners(fresh, path)
    torch.testing.assert_close(fresh(x), tuned(x), rtol=0, atol=0)


def test_stacked_tuners_on_a_functional_site_compose():
    base, x = build("swinv2")
    tuned = utdsl.compile("attn.qkv{q, v} -> parallel lowrank(r=2)\nattn.qkv -> sequential affine()\ntrain head",
                          base, x)
    randomize(tuned)
    torch.testing.assert_close(tuned(x), reference(base, tuned, x), rtol=0, atol=1e-5)


class _Transposed(nn.Module):
    """A block that uses ``proj``'s weight through ``torch.addmm`` and ``x @ w.t()``."""

    def __init__(self, form: str):
        super().__init__()
        self.proj, self.out, self.form = nn.Linear(8, 8), nn.Linear(8, 3), form

    def forward(self, x):
        if self.form == "addmm":
            h = torch.addmm(self.proj.bias, x, self.proj.weight.t())
        else:
            h = x @ self.proj.weight.t()
        return self.out(h)


@pytest.mark.parametrize("form", ["addmm", "matmul"])
def test_transposed_weight_calls_are_sites(form):
    torch.manual_seed(0)
    model, x = _Transposed(form).eval(), torch.randn(4, 8)
    tuned = utdsl.compile("proj -> parallel lowrank(r=2)\nproj -> sequential affine()", model, x)
    randomize(tuned)
    unit = tuned.get_submodule("tuners.proj.parallel_lowrank").units["full"]
    affine = tuned.get_submodule("tuners.proj.sequential_affine").units["full"]
    weight = model.proj.weight + unit.scaling * unit.up.weight @ unit.down.weight
    h = x @ weight.t() + (model.proj.bias if form == "addmm" else 0)
    torch.testing.assert_close(tuned(x), model.out(h * affine.scale + affine.shift), rtol=0, atol=1e-6)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(F.linear(x, self.proj.weight), self.proj.weight)


def test_a_weight_used_twice_functionally_is_a_clear_error():
    with pytest.raises(utdsl.SpecError, match="never called, and its weight is used by 2 functional calls"):
        utdsl.compile("proj -> parallel lowrank(r=2)", _Shared(), torch.randn(2, 8))


def test_eva02_with_separate_q_k_v_and_swiglu():
    """``qkv_fused=False`` has q_proj/k_proj/v_proj (called) and a SwiGLU MLP: the library specs'
    alternatives reach them (lora: q_proj, v_proj; ssf: every linear, fc1_g and fc1_x included)."""
    torch.manual_seed(0)
    base = timm.create_model("eva02_base_patch14_224", img_size=28, depth=1, embed_dim=32, num_heads=2,
                             num_classes=5).eval()
    x = torch.randn(1, 3, 28, 28)
    assert base.blocks[0].attn.qkv is None and hasattr(base.blocks[0].mlp, "fc1_g")
    lora = utdsl.compile("lora", base, x)
    assert {i.site for i in lora.meta["utdsl"].plan.insertions} == {"blocks.0.attn.q_proj", "blocks.0.attn.v_proj"}
    tuned = utdsl.compile("ssf", base, x)
    sites = {i.site for i in tuned.meta["utdsl"].plan.insertions}
    assert sites == {"patch_embed", "norm", *(f"blocks.0.{s}" for s in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2",
        "norm1", "norm2"))}
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)

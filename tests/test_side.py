"""The ``side`` placement and Res-Tuning-Bypass (``specs/restuning_bypass.ut``): exact count on
ViT-B/16, equivalence with a hand-written version of the official formula (forward and every
gradient) on ViT, DeiT (distillation token) and Swin, no gradient into the backbone, the plan,
checkpoints, merge, and errors at the rule."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import utdsl
from utdsl.errors import SpecError
from utdsl.verify import verify

from .conftest import meta_model, tiny_vit, trainable_without_head
from .reference import randomize_tuners

# 12 blocks x (lateral + vertical) x (down 768x32 + 32, up 32x768 + 768)
RESTUNING_BYPASS_VIT_B16 = 1_198_848


def test_restuning_bypass_count_on_vit_b16():
    tuned = utdsl.compile("restuning_bypass", meta_model())
    assert trainable_without_head(tuned) == RESTUNING_BYPASS_VIT_B16
    plan = tuned.meta["utdsl"].plan
    assert [i.site for i in plan.insertions] == [f"blocks.{i}" for i in range(12)]
    assert {i.params for i in plan.insertions} == {2 * (768 * 32 + 32 + 32 * 768 + 768)}


def _units(tuned, sites):
    namespace = tuned.meta["utdsl"].plan_namespace
    return [tuned.get_submodule(f"{namespace}.{site}.side_res_adapter").units["full"] for site in sites]


def _res_adapter(bottleneck, z):
    """swift's ResAdapter without its residual: ln2(gelu(ln1(z)))."""
    return F.linear(F.gelu(F.linear(z, bottleneck.down.weight, bottleneck.down.bias)),
                    bottleneck.up.weight, bottleneck.up.bias)


def _step(unit, h, s, lateral="adapter", vertical="adapter"):
    """ResTunerBypassBlock: lateral(h) + vertical(s), each term z + ResAdapter(z), z, or nothing."""
    def term(mode, bottleneck, z):
        return None if mode == "zero" else z if mode == "identity" else z + _res_adapter(bottleneck, z)
    terms = [t for t in (term(lateral, unit.lateral, h), term(vertical, unit.vertical, s)) if t is not None]
    return terms[0] + terms[1] if len(terms) == 2 else terms[0]


def _vit_bypass(base, units, join="replace", **modes):
    """Res-Tuning-Bypass on a timm ViT/DeiT, as swift's hooks compute it: the bypass starts at the
    (detached) input of blocks.0, each block's detached output feeds one bypass block, the final
    norm reads the bypass."""
    def forward(x):
        x = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
        s = x.detach()
        for block, unit in zip(base.blocks, units):
            x = block(x)
            s = _step(unit, x.detach(), s, **modes)
        return base.forward_head(base.norm(s if join == "replace" else x.detach() + s))
    return forward


def _assert_same(tuned, reference, x, params, atol=1e-5) -> float:
    """Outputs and the gradients of every tuner parameter agree within ``atol``; every such
    gradient is non-zero; the input gets no gradient in either (nothing flows into the backbone)."""
    tuned.eval()
    weights = torch.randn(tuned(x).shape, generator=torch.Generator().manual_seed(1))
    results = []
    for run in (tuned, reference):
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        loss = (out * weights).sum()
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        assert torch.autograd.grad(loss, [xi], allow_unused=True) == (None,)
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    worst = (out_a - out_b).abs().max().item()
    assert worst <= atol, f"outputs differ by {worst}"
    for index, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        diff = (ga - gb).abs().max().item()
        assert diff <= atol, f"gradient {index} ({tuple(ga.shape)}) differs by {diff}"
        assert ga.abs().max() > 0, f"gradient {index} ({tuple(ga.shape)}) is zero"
        worst = max(worst, diff)
    return worst


def test_restuning_bypass_equals_the_official_formula_on_vit():
    base = tiny_vit(drop_path_rate=0.1)
    tuned = utdsl.compile("restuning_bypass", base)
    params = randomize_tuners(tuned)
    units = _units(tuned, ["blocks.0", "blocks.1"])
    assert units[0].lateral.down.out_features == 32 and isinstance(units[0].lateral.act, torch.nn.GELU)
    torch.manual_seed(0)
    assert _assert_same(tuned, _vit_bypass(base, units), torch.randn(2, 3, 32, 32), params) < 1e-5


@pytest.mark.parametrize("join, lateral, vertical", [
    ("add", "adapter", "adapter"), ("replace", "adapter", "identity"), ("replace", "identity", "adapter"),
    ("replace", "zero", "adapter")])
def test_join_and_term_options_equal_their_formulas(join, lateral, vertical):
    base = tiny_vit()
    spec = f'blocks.* -> side res_adapter(dim=4, at="^norm", join={join}, lateral={lateral}, vertical={vertical})'
    tuned = utdsl.compile(spec, base)
    params = randomize_tuners(tuned)
    units = _units(tuned, ["blocks.0", "blocks.1"])
    reference = _vit_bypass(base, units, join=join, lateral=lateral, vertical=vertical)
    _assert_same(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_two_chains_adding_at_one_injection_point():
    """Each chain reads its own sites; the norm reads detach(x) + s_a + s_b."""
    base = tiny_vit()
    tuned = utdsl.compile('blocks[0] -> side res_adapter(dim=4, at="^norm", join=add)\n'
                          'blocks[1] -> side res_adapter(dim=4, at="^norm", join=add)', base)
    params = randomize_tuners(tuned)
    first, second = _units(tuned, ["blocks.0", "blocks.1"])

    def reference(x):
        x = base.norm_pre(base._pos_embed(base.patch_embed(x)))
        s_a = _step(first, base.blocks[0](x).detach(), x.detach())
        y = base.blocks[0](x)
        s_b = _step(second, base.blocks[1](y).detach(), y.detach())
        return base.forward_head(base.norm(base.blocks[1](y).detach() + s_a + s_b))

    _assert_same(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_restuning_bypass_on_deit_with_a_distillation_token():
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    tuned = utdsl.compile("restuning_bypass", base)
    params = randomize_tuners(tuned)
    reference = _vit_bypass(base, _units(tuned, ["blocks.0", "blocks.1"]))
    _assert_same(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_a_bypass_over_swins_last_stage():
    """Swin's blocks are NHWC maps: the bypass reads the last stage's blocks (one shape) and
    replaces the final norm's input."""
    torch.manual_seed(0)
    base = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, depths=(1, 2), num_heads=(1, 2),
                             embed_dim=16, window_size=4, num_classes=5).eval()
    tuned = utdsl.compile('layers.1.blocks.* -> side res_adapter(dim=4, at="^norm")', base)
    params = randomize_tuners(tuned)
    units = _units(tuned, ["layers.1.blocks.0", "layers.1.blocks.1"])

    def reference(x):
        x = base.layers[1].downsample(base.layers[0](base.patch_embed(x)))
        s = x.detach()
        for block, unit in zip(base.layers[1].blocks, units):
            x = block(x)
            s = _step(unit, x.detach(), s)
        return base.forward_head(base.norm(s))

    _assert_same(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_no_gradient_reaches_the_backbone_and_autograd_keeps_none_of_its_activations():
    """Even with backbone biases set to train, the chain reads detached values: the blocks' biases
    get no gradient (the final norm's, after the injection point, does), no block's output requires
    grad, and nothing of an MLP's hidden width is saved for the backward."""
    base = tiny_vit()
    tuned = utdsl.compile('use "restuning_bypass"\ntrain **.bias', base).train()
    seen = []
    hooks = [tuned.get_submodule(f"blocks.{i}.mlp.{name}").register_forward_hook(
        lambda module, args, out: seen.append(out.requires_grad)) for i in range(2) for name in ("fc1", "fc2")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = tuned(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert seen == [True] * 4                      # biases train: the backbone itself records a graph...
    out.sum().backward()
    grads = {name: p.grad for name, p in tuned.named_parameters() if p.requires_grad}
    assert all(grads[name] is None for name in grads if name.startswith("blocks."))   # ...that no gradient uses
    assert grads["norm.bias"] is not None and all(grads[n] is not None for n in grads if n.startswith("tuners."))

    plain = utdsl.compile("restuning_bypass", tiny_vit()).train()
    outputs = []
    hooks = [plain.get_submodule(f"blocks.{i}.{name}").register_forward_hook(
        lambda module, args, out: outputs.append(out.requires_grad))
        for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        plain(torch.randn(2, 3, 32, 32)).sum().backward()
    for hook in hooks:
        hook.remove()
    assert outputs == [False] * 8
    assert not any(shape[-1] == 4 * 192 for shape in saved)          # no MLP hidden activation kept
    assert not any(len(shape) == 4 for shape in saved)               # no attention map or q/k/v kept


def test_the_plan_shows_the_chain_and_it_is_not_merged(cli):
    tuned = utdsl.compile("restuning_bypass", tiny_vit())
    (first, second) = tuned.meta["utdsl"].plan.insertions
    assert (first.module_name, first.placement, first.mergeable, first.identity_at_init) == (
        "tuners.blocks.0.side_res_adapter", "side", False, False)
    assert first.info.extras["side_into"] == "norm" and first.info.extras["side_join"] == "replace"
    code, out, _ = cli("compile", "restuning_bypass", "--model", "vit_b16")
    assert code == 0
    row = next(line for line in out.splitlines() if "blocks.*" in line)
    assert "side → norm (replace)" in row and "res_adapter" in row and "1,198,848" in row
    merged = utdsl.merge(tuned)
    assert any(n.op == "call_module" and n.target.endswith("side_res_adapter") for n in merged.graph.nodes)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(merged(x), tuned(x))


def test_verify_checkpoints_and_pickling(tmp_path):
    base = tiny_vit()
    tuned = utdsl.compile("restuning_bypass", base)
    randomize_tuners(tuned)
    x = torch.randn(2, 3, 32, 32)
    report = verify(base, tuned, x)
    assert report.ok and not report.identity_expected and report.max_abs_diff > 0
    path = utdsl.save_tuners(tuned, tmp_path / "bypass.safetensors")
    again = utdsl.compile("restuning_bypass", tiny_vit())
    utdsl.load_tuners(again, path)
    assert torch.equal(again(x), tuned(x))
    other = utdsl.compile("restuning_bypass", tiny_vit(), overrides={"dim": "8"})
    with pytest.raises(utdsl.CheckpointError, match="dim is 32 in the checkpoint, 8 in this model"):
        utdsl.load_tuners(other, path)
    torch.save(tuned, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(restored(x), tuned(x))


def _error(spec: str):
    with pytest.raises(SpecError) as err:
        utdsl.compile(spec, tiny_vit())
    (d,) = err.value.diagnostics
    return d


def test_an_injection_point_that_matches_nothing_is_an_error_at_the_argument():
    d = _error('blocks.* -> side res_adapter(at="nrom")')
    assert d.message == ('blocks.0 (and 1 more like it: blocks.1): the injection point at="nrom" matches no '
                         "module of the model")
    assert (d.line, d.column) == (1, 33) and d.hint.startswith("closest real paths: norm")


def test_an_injection_point_matching_several_modules_is_an_error():
    d = _error('blocks.* -> side res_adapter(at="norm1")')
    assert d.message.endswith('the injection point at="norm1" matches 2 modules (blocks.0.norm1, '
                              "blocks.1.norm1); a side chain is injected at one")
    assert (d.line, d.column) == (1, 33)


def test_an_injection_point_before_a_read_site_is_an_error():
    d = _error('blocks.* -> side res_adapter(at="blocks.1")')
    assert d.message == ("blocks.1: the injection point 'blocks.1' reads its input before this site's output "
                         "is computed; a side chain is injected after the last value it reads")
    assert (d.line, d.column) == (1, 33)


def test_a_replacing_chain_does_not_share_its_injection_point():
    d = _error('blocks[0] -> side res_adapter(at="^norm")\nblocks[1] -> side res_adapter(at="^norm", join=add)')
    assert d.message == ("blocks.1: the rule at line 1 also injects a side chain at 'norm'; rules sharing an "
                         "injection point must all add to it (join=add)")
    assert (d.line, d.column) == (2, 34)


@pytest.mark.parametrize("spec, message, column", [
    ('mlp.fc1 -> side res_adapter(at="^norm")',
     "blocks.0.mlp.fc1 (and 1 more like it: blocks.1.mlp.fc1): this site's output is 2x5x768, the injection "
     "point's input is 2x5x192; a side chain carries one state of that shape", 1),
    ('attn.qkv{q} -> side res_adapter(at="^norm")',
     "blocks.0.attn.qkv (and 1 more like it: blocks.1.attn.qkv): a side chain reads whole values; this rule "
     "names chunks of one", 1),
    ('blocks.* -> side res_adapter(dim=4)', "tuner 'res_adapter' needs the argument 'at'", 18),
    ('blocks.* -> side res_adapter(at="blocks[")',
     "bad value for 'at': 'blocks[' is not a module selector: unexpected end of input", 33),
    ('blocks.* -> side adapter(dim=4)', "tuner 'adapter' does not accept placement 'side'", 13),
])
def test_side_misuse_is_an_error_at_the_rule(spec, message, column):
    d = _error(spec)
    assert d.message == message and (d.line, d.column) == (1, column)

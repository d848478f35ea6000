"""Backbones that are not timm's (utdsl.backends): torchvision's ViT (nn.MultiheadAttention traced
through) and ResNet, and Hugging Face transformers models (traced by torch.export). Each case
compiles, equals the base at init, trains only its tuners, round-trips a checkpoint and merges."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import utdsl
from utdsl.backends import multihead_attention_forward, prepare
from utdsl.errors import SpecError
from utdsl.trace import trace


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])


def _check(model: nn.Module, spec: str, x: torch.Tensor, tmp_path, *, identity=True, merge=False):
    model.eval()
    tuned = utdsl.compile(spec, model, x)
    report = utdsl.verify(model, tuned, x)
    assert report.lint_ok and not report.unexpected_trainable and not report.missing_trainable
    if identity:
        assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5, report.lines()
    namespace = tuned.meta["utdsl"].plan_namespace + "."
    _tensor(tuned(x)).sum().backward()   # in eval mode: batch-norm statistics stay as compiled
    grads = {n for n, p in tuned.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(namespace) for n in grads), sorted(grads)[:3]
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
        path = utdsl.save_tuners(tuned, tmp_path / "t.safetensors")
        again = utdsl.compile(spec, model, x)
        utdsl.load_tuners(again, path)
        assert torch.equal(_tensor(again.eval()(x)), _tensor(tuned(x)))
        if merge:
            merged = utdsl.merge(tuned).eval()
            assert not any(n.startswith(namespace) for n, _ in merged.named_parameters())
            assert (_tensor(merged(x)) - _tensor(tuned(x))).abs().max() <= 1e-5
    return tuned


# --- torchvision ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tv_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128, num_classes=10).eval()


TV_VIT_CASES = [
    ("self_attention.in_proj{q, v} -> parallel lowrank(r=4)", True, True),
    ("encoder.layers.*.mlp -> sequential adapter(dim=8)", True, False),
    ("self_attention.in_proj{k, v} -> sequential affine(shift=false)\nmlp.0 -> sequential affine()", True, True),
    ("self_attention -> parallel adapter(dim=8)", True, False),
    ("^encoder.layers -> prompt tokens(length=3)", True, False),
    ("encoder.layers.* -> prompt tokens(length=3)", True, False),
    ("self_attention -> prefix kv(length=4)", False, False),
]


@pytest.mark.parametrize("spec,identity,merge", TV_VIT_CASES, ids=[c[0].split(" ->")[0] for c in TV_VIT_CASES])
def test_torchvision_vit(tv_vit, tmp_path, spec, identity, merge):
    _check(tv_vit, spec, torch.randn(2, 3, 32, 32), tmp_path, identity=identity, merge=merge)


def test_torchvision_vit_keeps_names_and_prefix_tokens(tv_vit):
    tuned = utdsl.compile("^encoder.layers -> prompt tokens(length=3)", tv_vit, torch.randn(2, 3, 32, 32))
    assert tuned.num_prefix_tokens == 1
    base_keys = set(tv_vit.state_dict())
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in base_keys
    assert base_keys <= set(tuned.state_dict())
    assert not hasattr(tv_vit.encoder.layers.encoder_layer_0.self_attention, "in_proj")  # caller's model untouched


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_traced_multihead_attention_equals_torch(batch_first, need_weights):
    torch.manual_seed(0)
    mha = prepare(nn.MultiheadAttention(16, 4, batch_first=batch_first)).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    expected, expected_w = mha(x, x, x, need_weights=need_weights)
    got, got_w = multihead_attention_forward(mha, x, x, x, need_weights=need_weights)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got_w is None) == (expected_w is None)
    if need_weights:
        assert torch.allclose(got_w, expected_w, atol=1e-6)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.register_buffer("mask", torch.zeros(5, 5, dtype=torch.bool))

    def forward(self, x):
        return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]


def test_masked_multihead_attention_stays_a_leaf_and_in_proj_is_a_clear_error():
    model = _Masked().eval()
    assert any(n.op == "call_module" and n.target == "attn" for n in trace(model).graph.nodes)
    with pytest.raises(SpecError, match="runs inside 'attn' \\(MultiheadAttention\\)"):
        utdsl.compile("attn.in_proj -> parallel lowrank(r=2)", model, torch.randn(2, 5, 16))


RESNET_CASES = [
    ("layer1.*.conv1 -> parallel lowrank(r=4)", False),
    ("layer2 -> sequential adapter(dim=8)", False),
    ("^conv1 | layer1.*.conv2 -> sequential affine()", True),
    ("bn1 | layer1.*.bn2 -> sequential affine()", True),    # folds into the batch norms' weight and bias
]


@pytest.mark.parametrize("spec,merge", RESNET_CASES, ids=[c[0].split(" ->")[0] for c in RESNET_CASES])
def test_torchvision_resnet(tmp_path, spec, merge):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _check(model, spec, torch.randn(2, 3, 32, 32), tmp_path, merge=merge)


# --- Hugging Face transformers -----------------------------------------------------------------

def _hf():
    return pytest.importorskip("transformers")


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             image_size=32, patch_size=16)


@pytest.fixture(scope="module")
def hf_vit():
    T = _hf()
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(**SMALL, num_labels=10)).eval()


def _hf_names(T) -> tuple[str, str]:
    """q/v projection names of this transformers version's ViT attention."""
    names = {n.rsplit(".", 1)[-1] for n, _ in T.ViTForImageClassification(T.ViTConfig(**SMALL)).named_modules()}
    return ("q_proj", "v_proj") if "q_proj" in names else ("query", "value")


HF_VIT_CASES = [
    ("lowrank", "attention.{q} | attention.{v} -> parallel lowrank(r=4)", True, True),
    ("adapter", "layers.*.mlp | layer.*.output -> sequential adapter(dim=8)", True, False),
    ("affine", "attention.{q} | attention.{v} -> sequential affine()", True, True),
    ("prefix", "layers.*.attention | layer.*.attention.attention -> prefix kv(length=4)", False, False),
]


@pytest.mark.parametrize("name,spec,identity,merge", HF_VIT_CASES, ids=[c[0] for c in HF_VIT_CASES])
def test_hf_vit(hf_vit, tmp_path, name, spec, identity, merge):
    T = _hf()
    q, v = _hf_names(T)
    tuned = _check(hf_vit, spec.format(q=q, v=v), torch.randn(2, 3, 32, 32), tmp_path, identity=identity, merge=merge)
    assert type(tuned(torch.randn(3, 3, 32, 32))) is type(hf_vit(torch.randn(3, 3, 32, 32)))   # any batch


def test_hf_prompt_is_a_clear_error(hf_vit):
    with pytest.raises(SpecError, match="torch.export"):
        utdsl.compile("layers.* | layer.* -> prompt tokens(length=3)", hf_vit, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("family", ["dinov2", "dinov2_registers", "clip"])
def test_hf_backbones(tmp_path, family):
    T = _hf()
    torch.manual_seed(0)
    if family == "dinov2":
        model, tokens = T.Dinov2Model(T.Dinov2Config(**SMALL)), 1
    elif family == "dinov2_registers":
        if not hasattr(T, "Dinov2WithRegistersModel"):
            pytest.skip("this transformers has no Dinov2WithRegistersModel")
        model, tokens = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)), 3
    else:
        model, tokens = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)), 1
    q, v = _hf_names(T)
    attention = "self_attn" if family == "clip" else "attention"
    spec = f"{attention}.{q} | {attention}.{v} | mlp.fc1 -> parallel lowrank(r=4)"
    tuned = _check(model, spec, torch.randn(2, 3, 32, 32), tmp_path, merge=True)
    assert tuned.num_prefix_tokens == tokens


# --- models torch.fx cannot trace symbolically: torch.export instead ----------------------------

class _ShapeMath(nn.Module):
    """Control flow on a size, which torch.fx cannot trace (a Proxy has no truth value)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[1] % 4:
            x = nn.functional.pad(x, (0, 0, 0, 4 - x.shape[1] % 4))
        return self.out(self.fc(x).mean(1))


def test_a_model_fx_cannot_trace_is_exported_instead():
    torch.manual_seed(0)
    model, x = _ShapeMath().eval(), torch.randn(2, 6, 8)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    tuned = utdsl.compile("fc -> parallel lowrank(r=2)\ntrain out", model, x)
    assert tuned.meta["utdsl_backend"] == "export"
    assert torch.equal(tuned(x), model(x))
    assert utdsl.trainable_parameters(tuned) == 2 * 8 + 8 * 2 + 3 * 8 + 3


def test_a_site_inside_a_block_fx_keeps_whole_is_reached_through_export():
    import timm

    torch.manual_seed(0)
    model, x = timm.create_model("mobilevit_xxs", num_classes=3).eval(), torch.randn(2, 3, 64, 64)
    tuned = utdsl.compile("transformer.*.attn.qkv{q, v} -> parallel lowrank(r=2)", model, x)
    insertions = tuned.meta["utdsl"].plan.insertions
    assert [i.site for i in insertions][0] == "stages.2.1.transformer.0.attn.qkv" and len(insertions) == 9
    assert torch.equal(tuned(x), model(x))
    assert tuned(torch.randn(3, 3, 64, 64)).shape == (3, 3)   # the batch stays free

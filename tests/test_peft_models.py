"""Compiled weight-space specs against the real peft package on a timm ViT: the same configuration
on every block's qkv, the same random non-zero adapter values, the same logits within 1e-5."""

from __future__ import annotations

import pytest
import torch

import utdsl
from utdsl.placements.base import FULL

from .conftest import tiny_vit

peft = pytest.importorskip("peft")

#: method -> (peft config class, its arguments, the utdsl rule's tuner, utdsl -> peft attribute names
#: (None: the same names), attributes that scale the weight multiplicatively)
CASES = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8), "lora(r=4, alpha=8)", None, ()),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, use_dora=True), "dora(r=4, alpha=8)",
             {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": "lora_magnitude_vector"},
             ("lora_magnitude_vector",)),
    "vera": ("VeraConfig", dict(r=16, d_initial=0.1, projection_prng_key=0, vera_dropout=0.0), "vera(r=16)",
             {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}, ()),
    "loha": ("LoHaConfig", dict(r=4, alpha=4), "loha(r=4, alpha=4)", None, ()),
    "lokr": ("LoKrConfig", dict(r=4, alpha=4), "lokr(r=4, alpha=4)", None, ()),
    "oft": ("OFTConfig", dict(oft_block_size=32, r=0, use_cayley_neumann=True, num_cayley_neumann_terms=5),
            "oft(block_size=32)", {"oft_R": "oft_R"}, ()),
    "boft": ("BOFTConfig", dict(boft_block_size=4, boft_n_butterfly_factor=1, boft_dropout=0.0),
             "boft(block_size=4, n_butterfly_factor=1)", {"boft_R": "boft_R", "boft_s": "boft_s"}, ("boft_s",)),
}


def peft_model(method: str, monkeypatch):
    config_name, config_args, *_ = CASES[method]
    if method == "boft":   # CPU: no CUDA extension to build
        import peft.tuners.boft.layer as boft_layer
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    config = getattr(peft, config_name)(target_modules=["qkv"], **config_args)
    return peft.get_peft_model(tiny_vit(), config).eval()


def copy_random_values(ours, theirs, method: str) -> None:
    """Random non-zero values into every peft adapter; the same values into the utdsl unit."""
    _, _, _, names, multiplicative = CASES[method]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for insertion in ours.meta["utdsl"].plan.insertions:
            unit = ours.get_submodule(insertion.module_name).units[FULL]
            layer = theirs.get_base_model().get_submodule(insertion.site)
            for mine, attribute in (names or {n: n for n, _ in unit.named_parameters()}).items():
                target = getattr(layer, attribute)["default"]
                target = target.weight if isinstance(target, torch.nn.Module) else target
                noise = torch.randn(target.shape, generator=generator)
                value = target * (1 + 0.1 * noise) if attribute in multiplicative else 0.2 * noise
                target.copy_(value)
                getattr(unit, mine).copy_(value.reshape(getattr(unit, mine).shape))


@pytest.mark.parametrize("method", sorted(CASES))
def test_weight_spec_equals_peft_on_a_timm_vit(method, monkeypatch):
    theirs = peft_model(method, monkeypatch)
    ours = utdsl.compile(f"attn.qkv -> weight {CASES[method][2]}", tiny_vit()).eval()
    assert utdsl.trainable_parameters(ours) == sum(
        p.numel() for n, p in theirs.named_parameters() if p.requires_grad)
    copy_random_values(ours, theirs, method)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, peft_out = ours(x), theirs(x)
        with theirs.disable_adapter():
            base = theirs(x)
    assert (peft_out - base).abs().max() > 1e-3           # the adapters do move the output
    torch.testing.assert_close(mine, peft_out, rtol=1e-5, atol=1e-5)

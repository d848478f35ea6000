"""Fuzzing the whole compile path: random specs over a small model's real module paths.

Every outcome is either a tuned model that runs forward and backward, at the input size it was
compiled at and at another, trains only what the spec says, and equals the base model at init
where its tuners promise it, or a ``UtdslError``; never another exception, at compile or at the
first forward.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utdsl
from utdsl.errors import UtdslError
from utdsl.selectors import generalize

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: small models of two layouts (tokens with a class token, NCHW maps): the input compiled at, and
#: another size the compiled model must also run at (a tuner sized on a spatial axis would not)
MODELS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5,
                                      dynamic_img_size=True), (2, 3, 32, 32), (1, 3, 48, 32)),
    "resnet": (lambda: timm.create_model("resnet10t", num_classes=5), (2, 3, 40, 56), (1, 3, 64, 64)),
    "convnext": (lambda: timm.create_model("convnext_atto", num_classes=5), (2, 3, 64, 64), (1, 3, 32, 96)),
}

TUNERS = {
    "parallel": ["lowrank(r=2)", "lowrank(r=3, alpha=6)", "adapter(dim=4)", "adapter(dim=3, activation=gelu)"],
    "sequential": ["adapter(dim=4)", "affine()", "affine(shift=false)", "adapter(dim=2, scale=0.5)"],
    "prompt": ["tokens(length=2)", "tokens(length=1, init=normal)"],
    "prefix": ["kv(length=2)", "kv(length=3, reparam=true, hidden=8)"],
    "weight": ["lora(r=2)", "dora(r=2)", "vera(r=4)", "oft(block_size=4)", "fact_tt(r=2)", "lokr(r=2)"],
}
CHUNKS = ["", "{q, v}", "{0 of 2}", "{1, 2 of 4}"]


@functools.cache
def base_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


@functools.cache
def patterns(name: str) -> list[str]:
    """Selector-shaped module paths of the model (``blocks.*.attn.qkv``), each once."""
    return sorted({generalize(p) for p, _ in base_model(name).named_modules() if p})


@st.composite
def specs(draw, name: str) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(patterns(name)))
        placement = draw(st.sampled_from(sorted(TUNERS)))
        chunks = draw(st.sampled_from(CHUNKS)) if placement in ("parallel", "sequential", "weight") else ""
        lines.append(f"{path}{chunks} -> {placement} {draw(st.sampled_from(TUNERS[placement]))}")
    if draw(st.booleans()):
        lines.append("train @classifier")
    return "\n".join(lines)


def run_case(name: str, text: str) -> None:
    base = base_model(name)
    torch.manual_seed(1)
    x = torch.randn(*MODELS[name][1])
    try:
        tuned = utdsl.compile(text, base, x)
    except UtdslError as error:
        assert str(error)
        return
    plan = tuned.meta["utdsl"].plan
    with torch.no_grad():
        expected, got = base(x), tuned.eval()(x)
    assert got.shape == expected.shape
    if all(i.identity_at_init for i in plan.insertions):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    other = torch.randn(*MODELS[name][2])
    with torch.no_grad():
        assert tuned(other).shape == base(other).shape
    tuned.train()
    tuned(x).square().mean().backward()
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.startswith("tuners.") or n in plan.trained}
    assert utdsl.trainable_parameters(tuned) == plan.trainable_params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_specs_compile_to_a_working_model_or_a_clean_error(name):
    @FUZZ
    @given(specs(name))
    def check(text):
        run_case(name, text)

    check()

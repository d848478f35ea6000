"""Span sites: ``PARENT(A .. B)`` and ``PARENT(A ..< B)``, and the official AdaptFormer block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import utdsl
from utdsl.errors import SpecError
from utdsl.parse import parse
from utdsl.syntax import Run

from .conftest import meta_model, tiny_vit, trainable_without_head
from .reference import assert_equivalent, randomize_tuners


@pytest.mark.parametrize("text, start, end, inclusive", [
    ("blocks.*(norm2 .. drop_path2)", "norm2", "drop_path2", True),
    ("blocks.*(norm1..<norm2)", "norm1", "norm2", False),
    ("seq(0 .. 2)", "0", "2", True),
])
def test_span_syntax(text, start, end, inclusive):
    (path,) = parse(f"{text} -> parallel adapter").rules[0].selector.paths
    assert (path.span_site.start, path.span_site.end, path.span_site.inclusive) == (start, end, inclusive)
    again = parse(f"{path} -> parallel adapter").rules[0].selector.paths[0]
    assert str(again) == str(path) and again.span_site == Run(start, end, inclusive, again.span_site.span)


def _error(spec: str, model=None):
    with pytest.raises(SpecError) as err:
        utdsl.compile(spec, model if model is not None else tiny_vit())
    (d,) = err.value.diagnostics
    return d


def test_a_span_end_the_module_lacks_is_an_error_at_the_span_with_close_names():
    d = _error("blocks.*(norm2 .. drop_pth2) -> parallel adapter")
    assert d.message == "'blocks.0' has no child 'drop_pth2' (did you mean 'drop_path2', 'drop_path1'?)"
    assert (d.line, d.column) == (1, 9)


def test_span_ends_in_the_wrong_order_are_an_error():
    d = _error("blocks.*(mlp .. norm2) -> parallel adapter")
    assert d.message == "'mlp' does not come before 'norm2' in 'blocks.0'" and (d.line, d.column) == (1, 9)


def test_a_span_takes_parallel_or_sequential_only():
    d = _error("blocks.*(norm2 .. mlp) -> prompt tokens")
    assert d.message.endswith("a span site takes `parallel` or `sequential`, not `prompt`")


def test_span_site_names_in_the_plan_and_the_tuner_tree():
    tuned = utdsl.compile("adaptformer", tiny_vit())
    (first, second) = tuned.meta["utdsl"].plan.insertions
    assert (first.site, first.module_name) == ("blocks.0(norm2..drop_path2)",
                                               "tuners.blocks.0.span_norm2_to_drop_path2.parallel_adapter")
    assert not first.mergeable


def test_adaptformer_count_on_vit_b16_is_unchanged():
    # 12 x (768x64 + 64 + 64x768 + 768)
    assert trainable_without_head(utdsl.compile("adaptformer", meta_model())) == 1_189_632


def _official_adaptformer(base, units, scale=0.1):
    """AdaptFormer's block (ffn_option=parallel), written out: the adapter reads the residual stream x
    before norm2 and its output is added outside ls2 and drop_path2."""
    def forward(x):
        x = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
        for block, unit in zip(base.blocks, units):
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            adapt = F.linear(F.relu(F.linear(x, unit.down.weight, unit.down.bias)), unit.up.weight, unit.up.bias)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))) + scale * adapt
        return base.forward_head(base.norm(x))
    return forward


@pytest.mark.parametrize("options", [dict(drop_path_rate=0.1), dict(init_values=0.5, drop_path_rate=0.1)])
def test_adaptformer_equals_the_official_block(options):
    base = tiny_vit(**options)
    tuned = utdsl.compile("adaptformer", base)
    params = randomize_tuners(tuned)
    units = [tuned.get_submodule(f"tuners.blocks.{i}.span_norm2_to_drop_path2.parallel_adapter").units["full"]
             for i in range(2)]
    assert units[0].dropout.p == 0.1 and float(units[0].scale) == pytest.approx(0.1)
    torch.manual_seed(0)
    worst = assert_equivalent(tuned, _official_adaptformer(base, units), torch.randn(2, 3, 32, 32), params)
    assert worst < 1e-5


def test_adaptformer_train_graph_keeps_drop_path_off_the_adapter_branch():
    base = tiny_vit(drop_path_rate=0.5)
    tuned = utdsl.compile("adaptformer", base).train()
    code = tuned.code
    # block 1's drop path multiplies the MLP branch; the adapter's output is added after it
    joint = "span_norm2_to_drop_path2.parallel_adapter("
    call = code[code.index('getattr(self.tuners.blocks, "1").' + joint):].split("\n")[0]
    dropped = call.split("(")[-1].split(",")[0]
    assert code.index(f"{dropped} = blocks_1_ls2 * ") < code.index(call)


def test_an_exclusive_span_reaches_the_residual_stream():
    """`blocks.*(norm1 ..< norm2)`: the attention half up to what norm2 reads (the stream after the
    residual add); a sequential tuner there changes the stream for the MLP and the skip alike."""
    base = tiny_vit()
    tuned = utdsl.compile("blocks.*(norm1 ..< norm2) -> sequential adapter(dim=4, activation=gelu)", base)
    params = randomize_tuners(tuned)
    units = [tuned.get_submodule(f"tuners.blocks.{i}.span_norm1_upto_norm2.sequential_adapter").units["full"]
             for i in range(2)]

    def reference(x):
        x = base.norm_pre(base._pos_embed(base.patch_embed(x)))
        for block, unit in zip(base.blocks, units):
            x = x + block.attn(block.norm1(x))
            x = x + unit.up(F.gelu(unit.down(x)))
            x = x + block.mlp(block.norm2(x))
        return base.forward_head(base.norm(x))

    assert_equivalent(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_stacked_rules_on_one_span_compose_in_spec_order():
    base = tiny_vit()
    spec = ("blocks.*(norm2 .. drop_path2) -> sequential affine()\n"
            "blocks.*(norm2 .. drop_path2) -> parallel adapter(dim=4)\n")
    tuned = utdsl.compile(spec, base)
    params = randomize_tuners(tuned)
    units = [(tuned.get_submodule(f"tuners.blocks.{i}.span_norm2_to_drop_path2.sequential_affine").units["full"],
              tuned.get_submodule(f"tuners.blocks.{i}.span_norm2_to_drop_path2.parallel_adapter").units["full"])
             for i in range(2)]

    def reference(x):
        x = base.norm_pre(base._pos_embed(base.patch_embed(x)))
        for block, (affine, adapter) in zip(base.blocks, units):
            x = x + block.attn(block.norm1(x))
            h = block.mlp(block.norm2(x)) * affine.scale + affine.shift
            x = x + h + adapter.up(F.relu(adapter.down(x)))
        return base.forward_head(base.norm(x))

    assert_equivalent(tuned, reference, torch.randn(2, 3, 32, 32), params)

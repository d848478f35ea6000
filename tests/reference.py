"""Reference-equivalence checks: a compiled model against a hand-written formula of its method."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


def randomize_tuners(tuned: nn.Module, seed: int = 0, std: float = 0.2) -> list[torch.Tensor]:
    """Give every tuner parameter random non-zero values; return them (what the reference reads)."""
    namespace = tuned.meta["utdsl"].plan_namespace + "."
    generator = torch.Generator().manual_seed(seed)
    params = [p for name, p in tuned.named_parameters() if name.startswith(namespace)]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return params


def assert_equivalent(tuned: nn.Module, reference: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      params: list[torch.Tensor], atol: float = 1e-5) -> float:
    """``tuned(x)`` equals ``reference(x)`` within ``atol``, and so do the gradients of a fixed
    random projection of the output with respect to ``params`` (read by both) and to ``x``.
    Returns the largest difference seen."""
    tuned.eval()
    weights = torch.randn(tuned(x).shape, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    results = []
    for run in (tuned, reference):
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        grads = torch.autograd.grad((out * weights).sum(), [*params, xi])
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.shape == out_b.shape
    worst = (out_a - out_b).abs().max().item()
    assert worst <= atol, f"outputs differ by {worst}"
    for index, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        diff = (ga - gb).abs().max().item()
        assert diff <= atol, f"gradient {index} of {len(grads_a)} ({tuple(ga.shape)}) differs by {diff}"
        worst = max(worst, diff)
    # a gradient may be zero where the output cannot see it (the last block's patch tokens under a
    # cls-token head), but most must not be, or the check proves nothing
    nonzero = sum(bool(g.abs().max() > 0) for g in grads_a)
    assert nonzero >= 0.75 * len(grads_a), f"only {nonzero} of {len(grads_a)} gradients are non-zero"
    return worst


@contextlib.contextmanager
def forward_hooks(pairs):
    """``(module, hook)`` forward hooks registered for the block: a base model with a method's
    formula spliced in, the hand-written reference of a tuned model."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

"""Stage ``verify``: base model + compiled model -> :class:`Report`.

Checks that (1) the graph is well formed (fx lint), (2) exactly the tuners and the ``train``ed base
parameters require grad, and (3) where every tuner of the plan is the identity at init, the compiled
model's output equals the base model's on the same input (in eval mode, so dropout is off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .errors import UtdslError

__all__ = ["Report", "verify", "compiled_info"]


@dataclass
class Report:
    lint_ok: bool
    identity_expected: bool
    max_abs_diff: float | None          # None when the outputs were not compared
    unexpected_trainable: list[str] = field(default_factory=list)
    missing_trainable: list[str] = field(default_factory=list)
    tolerance: float = 1e-5

    @property
    def ok(self) -> bool:
        identity_ok = (not self.identity_expected or self.max_abs_diff is None
                       or self.max_abs_diff <= self.tolerance)
        return self.lint_ok and identity_ok and not self.unexpected_trainable and not self.missing_trainable

    def lines(self) -> list[str]:
        out = [f"graph lint: {'ok' if self.lint_ok else 'FAILED'}"]
        if self.max_abs_diff is not None:
            state = "expected" if self.identity_expected else "not expected (some tuner is not identity at init)"
            out.append(f"identity at init: {state}; max |compiled - base| = {self.max_abs_diff:.3g}")
        if self.unexpected_trainable:
            out.append("trainable but should not be: " + ", ".join(self.unexpected_trainable[:5]))
        if self.missing_trainable:
            out.append("frozen but should train: " + ", ".join(self.missing_trainable[:5]))
        return out


def compiled_info(model: nn.Module):
    """The :class:`~utdsl.compiler.CompiledInfo` stored on a model by ``utdsl.compile``."""
    info = getattr(model, "meta", {}).get("utdsl") if isinstance(model, fx.GraphModule) else None
    if info is None:
        raise UtdslError("this model was not compiled by utdsl.compile")
    return info


def verify(base: nn.Module, compiled: fx.GraphModule, example_input: torch.Tensor | None = None,
           *, tolerance: float = 1e-5) -> Report:
    """Check ``compiled`` against ``base``; compares outputs only when ``example_input`` is given
    and holds real data."""
    info = compiled_info(compiled)
    try:
        compiled.graph.lint()
        lint_ok = True
    except Exception:  # lint raises RuntimeError with the offending node
        lint_ok = False
    tuner_prefix = info.plan_namespace + "."
    should_train = set(info.plan.trained)
    unexpected, missing = [], []
    for name, p in compiled.named_parameters():
        expected = name.startswith(tuner_prefix) or name in should_train
        if p.requires_grad and not expected:
            unexpected.append(name)
        elif expected and not p.requires_grad:
            missing.append(name)
    identity = all(i.identity_at_init for i in info.plan.insertions)
    diff = None
    if example_input is not None and example_input.device.type != "meta":
        diff = _max_abs_diff(base, compiled, example_input)
    return Report(lint_ok, identity, diff, unexpected, missing, tolerance)


@torch.no_grad()
def _max_abs_diff(base: nn.Module, compiled: nn.Module, x: torch.Tensor) -> float:
    modes = base.training, compiled.training
    base.eval(), compiled.eval()
    try:
        expected, got = base(x), compiled(x)
    finally:
        base.train(modes[0]), compiled.train(modes[1])
    flat_expected, flat_got = _flatten(expected), _flatten(got)
    if len(flat_expected) != len(flat_got):
        return float("inf")
    return max((float((a.float() - b.float()).abs().max()) for a, b in zip(flat_expected, flat_got)), default=0.0)


def _flatten(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    return []

"""``--compile``: the training and evaluation forward through ``torch.compile`` (default mode).

:class:`CompiledModel` wraps the module the loop calls (the model, or its DDP wrapper) for its
forward only: parameters, checkpoints, optimizer state and the resume state stay those of the
model itself, so their names carry no ``_orig_mod.`` prefix and a run trained with ``--compile``
resumes and evaluates with or without it. A compiled utdsl model has no graph break (one graph a
mode); torch.compile's own recomputation choices keep fewer activations for the backward than the
eager model. The first call compiles (tens of seconds, more on a GPU); a backend that fails (no C++
compiler, an operation inductor cannot lower) stops with a :class:`~utdsl.errors.ModelError`
saying so, never a silent fall back to eager.
"""

from __future__ import annotations

import torch
from torch import nn

from utdsl.errors import ModelError

__all__ = ["CompiledModel", "compile_model"]


class CompiledModel(nn.Module):
    """``module`` with its forward compiled by ``torch.compile(module, mode=mode)``; attributes it
    lacks (DDP's ``no_sync``) are the wrapped module's."""

    def __init__(self, module: nn.Module, mode: str | None = None):
        super().__init__()
        self.compiled = torch.compile(module, mode=mode)

    def forward(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - only the compiler's own failures are translated
            if not _from_compiler(error):
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"torch.compile failed ({type(error).__name__}): {first[:300]}",
                             hint="run without --compile; the eager model trains the same") from error

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["compiled"], name)


def compile_model(module: nn.Module, enabled: bool = True) -> nn.Module:
    """``module`` as :class:`CompiledModel` when ``enabled``, else itself."""
    return CompiledModel(module) if enabled else module


def _from_compiler(error: BaseException) -> bool:
    """Whether ``error`` comes from dynamo's backend or inductor (not from the model's own code)."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    module = type(error).__module__ or ""
    return isinstance(error, BackendCompilerFailed) or module.startswith(("torch._inductor", "torch._dynamo"))

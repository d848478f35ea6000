"""Guards of the training loop: a non-finite loss, gradient or tensor, and Ctrl-C.

* :func:`step_flags` decides, once per optimizer step and the same on every rank, whether the
  step's loss or gradients are non-finite and whether a stop was asked for (one collective).
* :func:`require_finite` refuses to write (or load) a non-finite tensor: a diverged run never
  leaves a NaN checkpoint behind, and never a NaN ``best``.
* :class:`StopRequest` turns the first SIGINT into a request the loop honours at the next step
  boundary (it saves the resume state there, then raises :class:`Interrupted`, exit code 130); a
  second SIGINT stops at once. Data loader workers ignore SIGINT (:func:`ignore_sigint`), so a
  Ctrl-C on the terminal does not kill them under the loop.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Iterable, Mapping

import torch
from torch import nn

from utdsl.errors import CheckpointError, UtdslError

from .distributed import DistContext, all_reduce_sum

__all__ = ["NonFiniteError", "Interrupted", "StopRequest", "step_flags", "first_nonfinite",
           "require_finite", "ignore_sigint"]

DIVERGED_HINT = ("lower the learning rate (--lr), bound the update with a recipe clip_grad "
                 "(-o clip_grad=1.0), or skip such steps with -o nonfinite=skip")


class NonFiniteError(UtdslError):
    """Training produced a non-finite loss, gradient or parameter (the run diverged)."""


class Interrupted(UtdslError):
    """The run was stopped by Ctrl-C (SIGINT); the CLI exits with code 130."""

    exit_code = 130


def ignore_sigint(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data loaders: the main process decides what a Ctrl-C does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """While entered (in the main thread), the first SIGINT sets :attr:`requested`; the second
    raises KeyboardInterrupt as usual. Elsewhere (another thread) it does nothing."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]


def step_flags(loss_sum: torch.Tensor, model: nn.Module, stop: StopRequest, ctx: DistContext) -> tuple[bool, bool]:
    """``(nonfinite, stop)`` for the optimizer step about to be taken, agreed by every rank:
    ``nonfinite`` when the step's summed loss or any gradient is inf or NaN."""
    grads = _grads(model)
    total = loss_sum.detach().double().reshape(())
    if grads:
        total = total + torch.nn.utils.get_total_norm(grads).double().to(total.device)
    flags = [0.0 if bool(torch.isfinite(total)) else 1.0, 1.0 if stop.requested else 0.0]
    if ctx.distributed:
        flags = all_reduce_sum(flags, ctx)
    return flags[0] > 0, flags[1] > 0


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor holding an inf or NaN, else None."""
    for name, tensor in tensors:
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def require_finite(tensors: Mapping[str, torch.Tensor], where: str, *, loading: bool = False) -> None:
    """Raise when a tensor of ``tensors`` is not finite: :class:`NonFiniteError` before writing
    ``where``, :class:`CheckpointError` when ``loading`` it."""
    name = first_nonfinite(tensors.items())
    if name is None:
        return
    if loading:
        raise CheckpointError(f"'{where}': tensor '{name}' holds inf or NaN values",
                              hint="the checkpoint is damaged or comes from a diverged run")
    raise NonFiniteError(f"not writing '{where}': tensor '{name}' holds inf or NaN values (the run diverged)",
                         hint=DIVERGED_HINT)

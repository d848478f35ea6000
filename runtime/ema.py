"""Exponential moving average (EMA) of the trained parameters (recipe field ``ema_decay``).

After every optimizer step that updates the parameters (a skipped non-finite step is not one),
``shadow = d * shadow + (1 - d) * param`` for each parameter that requires grad, with
``d = min(ema_decay, (1 + n) / (10 + n))`` at the n-th update (0-based): the usual warm-up, so
the first shadows are not dominated by the initial values. The shadow is float32 whatever the
parameters' dtype. Frozen parameters and buffers (norm running statistics) are not averaged: the
model's own are used with the shadow.

Evaluation and the tuner checkpoints use the shadow (:meth:`ParameterEMA.applied`); the optimizer
keeps training the live parameters. The shadow and the update count are part of the resume state
(:meth:`ParameterEMA.state_tensors`, :meth:`ParameterEMA.load_state_tensors`): one file holds the
live parameters, the optimizer and the shadow, so they always agree.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from utdsl.errors import CheckpointError

__all__ = ["ParameterEMA", "EMA_PREFIX"]

#: key prefix of the shadow tensors in the resume state
EMA_PREFIX = "ema."


class ParameterEMA:
    """The EMA of ``model``'s trainable parameters (float32 copies on the parameters' device)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), not {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (warm-up capped by ``decay``)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live parameters into the shadow (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model's trainable parameters hold the shadow (cast to their dtype);
        the live values are restored after it, exactly, even when the block raises."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    # resume state ------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The shadow as ``ema.NAME`` CPU tensors and the metadata (update count, decay) that the
        resume state stores with them."""
        tensors = {EMA_PREFIX + n: t.detach().cpu().clone().contiguous() for n, t in self.shadow.items()}
        return tensors, {"ema": f'{{"updates": {self.updates}, "decay": {self.decay!r}}}'}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], where: str) -> None:
        """Restore the shadow from a resume state's tensors and metadata (``where`` names the file
        in errors): a state saved without an EMA, or for other parameters, is a CheckpointError."""
        import json

        saved = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if "ema" not in meta:
            raise CheckpointError(f"{where}: the resume state holds no EMA of the parameters, and the "
                                  f"recipe keeps one (ema_decay={self.decay})",
                                  hint="resume with the recipe the run started with")
        if set(saved) != set(self.shadow):
            raise CheckpointError(f"{where}: its EMA covers other parameters than the model's trainable ones")
        for name, tensor in saved.items():
            if tensor.shape != self.shadow[name].shape:
                raise CheckpointError(f"{where}: the EMA of '{name}' has shape {tuple(tensor.shape)}, the "
                                      f"model's is {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.updates = int(json.loads(meta["ema"])["updates"])

"""Exponential moving average (EMA) of the trained parameters (recipe field ``ema_decay``).

After every optimizer step, ``shadow = d * shadow + (1 - d) * param`` for each parameter that
requires grad, with ``d = min(ema_decay, (1 + n) / (10 + n))`` at the n-th update (the usual
warm-up, so early shadows are not dominated by the initial values). Evaluation and the tuner
checkpoints use the shadow (:meth:`ParameterEMA.applied`); the optimizer keeps training the live
parameters. For an exact resume the shadow is saved beside the resume state as
``checkpoints/ema-STEP.safetensors`` (older ones are removed once a newer state is written).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from utdsl.errors import CheckpointError
from utdsl.files import atomic_write

__all__ = ["ParameterEMA"]

_FILE = re.compile(r"ema-(\d+)\.safetensors$")


class ParameterEMA:
    """The EMA of ``model``'s trainable parameters (float32 copies on the parameters' device)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live parameters into the shadow (call after each optimizer step)."""
        decay = self.current_decay()
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model's trainable parameters hold the shadow; restored after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    # resume -------------------------------------------------------------------------------
    def save(self, directory: str | Path, step: int) -> Path:
        """Write the shadow for the resume state of optimizer step ``step``; drop older files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"ema-{step}.safetensors"
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}
        meta = {"updates": str(self.updates), "decay": repr(self.decay)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    def prune(self, directory: str | Path, keep_step: int) -> None:
        """Remove shadows of steps other than ``keep_step`` (after that step's state is saved)."""
        for path in Path(directory).glob("ema-*.safetensors"):
            match = _FILE.search(path.name)
            if match and int(match.group(1)) != keep_step:
                path.unlink(missing_ok=True)

    def load(self, directory: str | Path, step: int) -> None:
        """Restore the shadow saved with the resume state of optimizer step ``step``."""
        path = Path(directory) / f"ema-{step}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"'{path}' is missing: the run's resume state is at step {step} and "
                                  "its recipe keeps an EMA of the parameters")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        if set(tensors) != set(self.shadow):
            raise CheckpointError(f"'{path}': its parameters differ from the model's trainable ones")
        for name, tensor in tensors.items():
            self.shadow[name] = tensor.to(self.shadow[name].device, torch.float32)
        self.updates = int(meta.get("updates", step))

"""What a run costs: parameter counts, FLOPs of one forward, memory.

The training loop writes these into the ``summary`` row of ``metrics.jsonl`` at the end of a run
(see :func:`~.train.fit`); ``utdsl bench`` can read them from there.

Memory has two measures. :func:`peak_memory_mb` is the device's peak: on a GPU the CUDA caching
allocator's peak allocation since :func:`reset_peak_memory` (the standard figure); on the CPU the
process's peak resident set size (``ru_maxrss``, which counts everything the process ever held:
the interpreter, the backbone, the data, and cannot be reset). :class:`SavedActivations` is
device-independent: the bytes autograd keeps for backward during a forward pass (activations,
each storage counted once, the model's own parameters and buffers left out), which is what a
PETL method's memory saving is about.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

__all__ = ["parameter_counts", "forward_flops", "peak_memory_mb", "peak_memory_source", "reset_peak_memory",
           "SavedActivations"]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter elements of ``model``; shared parameters count once."""
    trainable = total = 0
    for parameter in model.parameters():  # parameters() yields a shared tensor once
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Floating-point operations of one forward pass of ``model`` on ``example`` (one sample: a
    tensor without the batch axis gets one), counted by ``torch.utils.flop_counter.FlopCounterMode``
    (a multiply-add is two; operations it has no formula for, such as element-wise ones, count 0).
    The model runs in eval mode with autograd on, as training runs it (no-grad fast paths add
    in place with kernels the counter does not see), on its own device and in its memory format;
    its mode and the global random state are restored afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example.unsqueeze(0).to(device)
    if example.dim() == 4 and _channels_last(model):
        example = example.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            counter = FlopCounterMode(display=False)
            with counter:
                model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _channels_last(model: nn.Module) -> bool:
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mb` (CUDA only; a process's RSS peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_source(device: torch.device) -> str:
    """What :func:`peak_memory_mb` measures on ``device``: ``cuda_max_allocated`` or ``process_max_rss``."""
    return "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB (see the module docstring for what it is on each device)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class SavedActivations:
    """Context manager counting the bytes autograd saves for backward inside it (``.bytes``,
    ``.mb``); ``model``'s parameters and buffers are not counted, each storage counts once."""

    def __init__(self, model: nn.Module | None = None):
        self._own = {_key(t) for t in (*model.parameters(), *model.buffers())} if model is not None else set()
        self._seen: set = set()
        self.bytes = 0
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _key(tensor)
        if key not in self._own and key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        return self.bytes / 2**20


def _key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes())

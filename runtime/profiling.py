"""What a run costs: parameter counts, FLOPs of one forward, peak memory.

The training loop writes these in a ``profile`` row at the start of a run (parameters, FLOPs) and
a ``summary`` row at its end (peak memory, images per second), both in ``metrics.jsonl``;
``utdsl bench`` puts them in its tables.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

__all__ = ["parameter_counts", "forward_flops", "peak_memory_mb", "reset_peak_memory"]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter elements of ``model``; shared parameters count once."""
    trainable = total = 0
    for parameter in model.parameters():  # parameters() yields a shared tensor once
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


@torch.no_grad()
def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Floating-point operations of one forward pass of ``model`` on ``example`` (one image: a
    ``(C, H, W)`` tensor gets a batch axis), counted by ``torch.utils.flop_counter`` (a multiply-add
    is two). The model runs in eval mode, on its own device; its mode and the global random state
    are restored afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    if example.dim() == 3:
        example = example.unsqueeze(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            counter = FlopCounterMode(display=False)
            with counter:
                model(example.to(device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mb` (CUDA only; a process's RSS peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: the CUDA caching allocator's peak allocation on a GPU, else the
    process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)

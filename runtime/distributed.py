"""Distributed data parallel under ``torchrun``, and the deterministic sampler every run uses.

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and starts a process group: nccl on CUDA, gloo on CPU. Without
those variables it returns a single-process context, so the same loop runs either way.

Data order is a pure function of (seed, epoch): :class:`EpochSampler` permutes the indices with a
generator seeded from both, pads them to a multiple of the world size (as ``DistributedSampler``
does), gives rank r every world-size-th index from r, and can start at a batch offset, so a resumed
epoch sees exactly the samples it had left. It yields ``(epoch, index)`` pairs; :class:`SeededDataset`
seeds each sample's augmentation from (seed, epoch, index), so augmentations do not depend on
worker count, worker assignment or where a run was resumed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from utdsl.errors import UtdslError

__all__ = ["DistContext", "DistributedError", "init_distributed", "shutdown", "peer_errors", "all_reduce_sum",
           "broadcast_str", "barrier", "mix_seed", "EpochSampler", "SeededDataset"]

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device, the backend (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


class DistributedError(UtdslError):
    """A process of a distributed run was lost or stalled past the recipe's ``dist_timeout``."""


def init_distributed(device: str | None = None, timeout: float | None = None) -> DistContext:
    """The context of this process; joins the torchrun process group when launched by torchrun.
    ``timeout`` (seconds) bounds every collective: a stalled or lost peer is an error after it,
    not a hang of torch's default 30 minutes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        wait = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None, **wait)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for one process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


_PEER_SIGNS = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "gloo", "nccl")


@contextlib.contextmanager
def peer_errors(ctx: DistContext, resume: str | None = None):
    """Turn a collective that failed because a peer died or stalled into a :class:`DistributedError`
    (one line, no traceback); ``resume`` names the run directory for the hint."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistError and gloo's RuntimeErrors
        text = str(error).strip()
        if not ctx.distributed or not (isinstance(error, getattr(dist, "DistError", ())) or
                                       any(sign in text.lower() for sign in _PEER_SIGNS)):
            raise
        line = text.splitlines()[0] if text else type(error).__name__
        raise DistributedError(f"rank {ctx.rank} of {ctx.world_size}: another process of the distributed run "
                               f"was lost or stalled ({line})",
                               hint=(f"resume with utdsl train --resume {resume} (same number of processes); "
                                     if resume else "") + "the recipe's dist_timeout bounds the wait") from None


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum ``values`` over every rank (float64, one collective)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_str(text: str, ctx: DistContext, size: int = 4096) -> str:
    """Rank 0's ``text`` on every rank (e.g. the run directory it chose)."""
    if not ctx.distributed:
        return text
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    buffer = torch.zeros(size, dtype=torch.uint8, device=device)
    if ctx.is_main:
        data = text.encode()[:size]
        buffer[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).rstrip(b"\0").decode()


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chained), stable across platforms."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK)) & _MASK
        state = (state + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Rank ``rank``'s share of epoch ``epoch``, as ``(epoch, index)`` pairs, from sample ``start``.

    With ``shuffle`` the order is ``randperm(n)`` seeded by (seed, epoch). With ``pad`` the list is
    padded by repeating its head to a multiple of ``world_size`` (every rank gets as many samples,
    which DDP needs); without it ranks may get one sample fewer (evaluation counts each sample once).
    """

    def __init__(self, n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, pad: bool = True, start: int = 0):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world_size, self.pad, self.start = rank, world_size, pad, start
        self._indices: list[int] | None = None

    def indices(self) -> list[int]:
        if self._indices is None:
            self._indices = self._compute()
        return self._indices

    def _compute(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.world_size > 1 and self.n:
            total = -(-self.n // self.world_size) * self.world_size
            order += (order * (total // self.n + 1))[: total - self.n]
        return order[self.rank :: self.world_size][self.start :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return len(self.indices())


class SeededDataset(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each sample's torch, python and numpy random
    state is seeded from (seed, epoch, index) and the caller's state is restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = mix_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

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

A lost or stalled process never hangs the others for torch's default 30 minutes: the process
group's timeout is the recipe's ``dist_timeout``; while a process waits in a collective (an
all-reduce of this module, DDP's forward and gradient sync: :func:`watch_ddp`) longer than a
heartbeat interval, it says so on stderr every interval (:class:`Heartbeat`); and
:func:`peer_errors` turns the failure that ends the wait (a timeout, a connection a dead peer
reset) into a one-line :class:`DistributedError` (exit code 2) naming what happened.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, get_worker_info

from utdsl.errors import UtdslError

__all__ = ["DistContext", "DistributedError", "init_distributed", "shutdown", "peer_errors", "all_reduce_sum",
           "broadcast_str", "barrier", "mix_seed", "EpochSampler", "SeededDataset", "Heartbeat",
           "heartbeat_interval", "watch_ddp", "DEFAULT_TIMEOUT"]

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device, the backend (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    #: seconds a collective waits for the other processes (the process group's timeout)
    timeout: float = 1800.0

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


#: torch's own timeout of a process group, used when the caller gives none
DEFAULT_TIMEOUT = 1800.0
_HEARTBEAT_MAX = 60.0


def heartbeat_interval(timeout: float) -> float:
    """Seconds between two heartbeat lines: a fifth of ``timeout``, within 1 s and 60 s."""
    return min(_HEARTBEAT_MAX, max(1.0, timeout / 5))


class Heartbeat:
    """A daemon thread that, while this process has waited in a collective for ``interval``
    seconds or more, writes one line to stderr every ``interval`` seconds: which rank waits, for
    how long, at what, and after how long the run gives up. :meth:`waiting` brackets a wait."""

    def __init__(self, ctx: "DistContext", interval: float | None = None, stream=None):
        self.ctx, self.interval = ctx, interval or heartbeat_interval(ctx.timeout)
        self.stream = stream
        self._lock = threading.Lock()
        self._open: dict[int, tuple[float, str]] = {}   # token -> (start, what)
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="utdsl-heartbeat", daemon=True)
        self._thread.start()

    def enter(self, what: str) -> int:
        with self._lock:
            self._next += 1
            self._open[self._next] = (time.monotonic(), what)
            return self._next

    def leave(self, token: int) -> None:
        with self._lock:
            self._open.pop(token, None)

    @contextlib.contextmanager
    def waiting(self, what: str):
        token = self.enter(what)
        try:
            yield
        finally:
            self.leave(token)

    def line(self, waited: float, what: str) -> str:
        ctx = self.ctx
        return (f"rank {ctx.rank} of {ctx.world_size}: waiting for the other processes at {what} for {waited:.0f} s; "
                f"if one stalled or died, the run stops after dist_timeout={ctx.timeout:g} s")

    def _run(self) -> None:
        reported: float = 0.0
        while not self._stop.wait(min(1.0, self.interval / 4)):
            with self._lock:
                oldest = min(self._open.values(), default=None)
            if oldest is None:
                reported = 0.0
                continue
            waited = time.monotonic() - oldest[0]
            if waited >= reported + self.interval:
                reported = waited
                print(self.line(waited, oldest[1]), file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_heartbeat: Heartbeat | None = None


def _waiting(what: str):
    return _heartbeat.waiting(what) if _heartbeat is not None else contextlib.nullcontext()


def init_distributed(device: str | None = None, timeout: float | None = None) -> DistContext:
    """The context of this process; joins the torchrun process group when launched by torchrun.
    ``timeout`` (seconds; torch's 30 minutes when None) bounds the rendezvous and every
    collective: a stalled or lost peer is a :class:`DistributedError` after it, not a hang, and a
    :class:`Heartbeat` reports waits longer than :func:`heartbeat_interval` meanwhile."""
    global _heartbeat
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    timeout = float(timeout or DEFAULT_TIMEOUT)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        try:
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError, bad variables
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise DistributedError(f"rank {rank} of {world_size}: the distributed run could not start at {where} "
                                   f"within dist_timeout={timeout:g} s ({_reason(error)})",
                                   hint="start every process (torchrun --nproc-per-node N starts them all), "
                                        "with the same MASTER_ADDR and MASTER_PORT") from None
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, timeout)
    if _heartbeat is None:
        _heartbeat = Heartbeat(ctx)
    return ctx


def shutdown(ctx: DistContext) -> None:
    """Leave the process group and stop the heartbeat (no-op for one process)."""
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.close()
        _heartbeat = None
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def watch_ddp(ddp: torch.nn.Module) -> torch.nn.Module:
    """Bracket the collectives of a ``DistributedDataParallel`` model by the heartbeat, so that a
    process waiting for a stalled peer inside DDP is reported too: its forward (where DDP
    broadcasts buffers and, once, rebuilds its buckets) and its gradient all-reduce in
    ``backward()`` (DDP's own all-reduce hook, registered as a comm hook: the gradients are DDP's
    default, the average over processes)."""
    if _heartbeat is None:
        return ddp
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    beat, forward = _heartbeat, []

    def hook(state, bucket):
        token = beat.enter("the gradient all-reduce")
        future = default_hooks.allreduce_hook(state, bucket)

        def done(result):
            beat.leave(token)
            return result.value()
        return future.then(done)

    def before(module, args):
        forward.append(beat.enter("a DDP forward"))

    def after(module, args, output):
        if forward:
            beat.leave(forward.pop())

    ddp.register_comm_hook(None, hook)
    ddp.register_forward_pre_hook(before)
    ddp.register_forward_hook(after, always_call=True)
    return ddp


_LOST = ("connection reset", "connection closed", "broken pipe", "connection refused", "end of file")
_STALLED = ("timed out", "timeout")
_PEER_SIGNS = (*_LOST, *_STALLED, "gloo", "nccl")


def _reason(error: BaseException) -> str:
    """The first sentence of a torch.distributed error, without gloo's source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0].rstrip(".")


@contextlib.contextmanager
def peer_errors(ctx: DistContext, resume: str | Callable[[], str | None] | None = None):
    """Turn a collective that failed because a peer died or stalled into a :class:`DistributedError`
    (one line, no traceback); ``resume`` names the run directory for the hint (or returns it, when
    it is chosen inside the block; None: no hint)."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistError and gloo's RuntimeErrors
        text = str(error).lower()
        if not ctx.distributed or not (isinstance(error, getattr(dist, "DistError", ())) or
                                       any(sign in text for sign in _PEER_SIGNS)):
            raise
        who = f"rank {ctx.rank} of {ctx.world_size}"
        if any(sign in text for sign in _LOST):
            what = f"{who}: another process of the distributed run died ({_reason(error)})"
        elif any(sign in text for sign in _STALLED):
            what = (f"{who}: another process of the distributed run stalled: no answer within "
                    f"dist_timeout={ctx.timeout:g} s ({_reason(error)})")
        else:
            what = f"{who}: a collective of the distributed run failed ({_reason(error)})"
        hint = "its own output says why" if any(sign in text for sign in _LOST) else \
            "raise the recipe's dist_timeout if a process is merely slow (-o dist_timeout=SECONDS)"
        run = resume() if callable(resume) else resume
        if run:
            hint += f"; resume with utdsl train --resume {run} (same number of processes)"
        raise DistributedError(what, hint=hint) from None


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        with _waiting("a barrier"):
            dist.barrier()


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum ``values`` over every rank (float64, one collective)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    with _waiting("an all-reduce"):
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
    with _waiting("a broadcast"):
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
        if get_worker_info() is not None:
            # a loader process: its random state is its own, nothing reads it after the sample
            # (saving and restoring numpy's took 0.2 ms a sample); the CPU generator only, as
            # torch.manual_seed also reseeds every GPU's (0.2 ms)
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

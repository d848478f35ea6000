"""Where trials run: on Ray (the default: this machine, or a running cluster), or one after the
other in this process (``--inline``: no Ray, for debugging).

:class:`RayExecutor` submits each trial as a Ray core task: one GPU a trial when the cluster has
GPUs (and CPUs only otherwise: ``cpus_per_trial``, fractional allowed, torch using that many
threads). A trial that raises anything but a utdsl error, or whose worker dies (killed, out of
memory), is retried up to ``retries`` times by Ray (``max_retries`` + ``retry_exceptions``); the
retry resumes the trial's run directory. A trial that still fails is reported as failed with the
cause, never dropped. Ray is imported only here, only when a bench runs, so ``import utdsl``
stays fast.

Both executors have the same two calls: :meth:`submit` a :class:`~.trials.TrialJob`, and
:meth:`next_done`, which blocks until some submitted trial has ended and returns its report.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

from .trials import TrialJob, TrialReport, run_trial

__all__ = ["InlineExecutor", "RayExecutor"]

Runner = Callable[[TrialJob], TrialReport]


def _cause(error: BaseException) -> str:
    """The message of a trial's exception, without Ray's wrapping and traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return _cause(cause)
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1].strip() if lines else ""
    name = type(error).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _check_reachable(address: str) -> None:
    """A BenchError at once when ``host:port`` does not accept connections (Ray itself waits
    minutes for a head node that is not there); ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    from .suites import BenchError

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise BenchError(f"cannot reach the Ray cluster at '{address}': {error.strerror or error}",
                         hint="start it with `ray start --head`, or leave out --address") from None


class InlineExecutor:
    """Runs each trial in this process when its report is asked for, in submission order."""

    def __init__(self, runner: Runner = run_trial, device: str = "auto", retries: int = 0):
        import torch

        self.runner = runner
        self.retries = retries
        self.device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.pending: list[TrialJob] = []

    def describe(self) -> str:
        return f"inline, one trial at a time on {self.device}"

    def threads(self) -> int:
        return 0

    def submit(self, job: TrialJob) -> None:
        self.pending.append(job)

    def has_pending(self) -> bool:
        return bool(self.pending)

    def next_done(self) -> TrialReport:
        job = self.pending.pop(0)
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                return self.runner(job)
            except Exception as error:  # noqa: BLE001 - reported as the trial's failure
                failure = _cause(error)
        return TrialReport(job.trial, "failed", error=f"{failure} (after {self.retries + 1} attempts)",
                           seconds=time.perf_counter() - start)

    def close(self) -> None:
        self.pending.clear()


class RayExecutor:
    """Trials as Ray tasks on ``ray.init(address=address)``: a new local instance when ``address``
    is None (``auto`` joins the cluster ``ray start`` runs on this machine), shut down by
    :meth:`close`. In a process where Ray is already initialised, that session is used."""

    def __init__(self, *, address: str | None = None, device: str = "auto", cpus_per_trial: float = 1.0,
                 retries: int = 2, runner: Runner = run_trial, num_cpus: int | None = None):
        import ray

        from .suites import BenchError

        self.ray = ray
        self.owned = False
        if not ray.is_initialized():
            options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            if address is None and num_cpus is not None:
                options["num_cpus"] = num_cpus
            if address is not None:
                _check_reachable(address)
            try:  # "local": a new instance, never a cluster someone else started here (--address auto)
                ray.init(address=address or "local", **options)
            except ConnectionError as error:
                raise BenchError(f"cannot reach the Ray cluster at '{address}': {error}",
                                 hint="start it with `ray start --head`, or leave out --address") from None
            self.owned = True
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if device == "cuda" and gpus < 1:
            raise BenchError("--device cuda: the Ray cluster has no GPU")
        self.device = "cuda" if gpus >= 1 and device != "cpu" else "cpu"
        if cpus_per_trial <= 0 or cpus_per_trial > max(resources.get("CPU", 1), 1e-9):
            raise BenchError(f"--cpus-per-trial {cpus_per_trial}: the cluster has {resources.get('CPU', 0):g} CPUs")
        self.cpus_per_trial = cpus_per_trial
        self.resources = resources
        self.retries = retries
        # a GPU trial gets a fresh worker process (max_calls=1): its GPU memory is released when
        # it ends, and the next trial's peak starts clean; CPU workers are reused (torch imported once)
        self.remote = (ray.remote(num_gpus=1, num_cpus=cpus_per_trial, max_calls=1)(runner) if self.device == "cuda"
                       else ray.remote(num_cpus=cpus_per_trial)(runner))
        self.pending: dict[Any, TrialJob] = {}

    def describe(self) -> str:
        cpus, gpus = self.resources.get("CPU", 0), self.resources.get("GPU", 0)
        per = "1 GPU" if self.device == "cuda" else f"{self.cpus_per_trial:g} CPU"
        return f"Ray, {cpus:g} CPUs and {gpus:g} GPUs, {per} a trial, {self.retries} retries"

    def threads(self) -> int:
        """torch threads of a CPU trial: its CPUs, at least one."""
        return max(1, math.floor(self.cpus_per_trial)) if self.device == "cpu" else 0

    def submit(self, job: TrialJob) -> None:
        ref = self.remote.options(max_retries=self.retries, retry_exceptions=True).remote(job)
        self.pending[ref] = job

    def has_pending(self) -> bool:
        return bool(self.pending)

    def next_done(self) -> TrialReport:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        job = self.pending.pop(ready[0])
        try:
            return self.ray.get(ready[0])
        except Exception as error:  # noqa: BLE001 - retries are spent: the trial failed
            return TrialReport(job.trial, "failed",
                               error=f"{_cause(error)} (after {self.retries + 1} attempts)")

    def close(self) -> None:
        for ref in list(self.pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        self.pending.clear()
        if self.owned:
            self.ray.shutdown()

"""How many loader processes a training process starts by default (:func:`default_workers`): the
cores this process may run on (its CPU affinity, capped by a cgroup CPU quota) shared by the
processes of its node."""

from __future__ import annotations

import math
import os

__all__ = ["default_workers", "cpu_quota"]


def default_workers() -> int:
    """Loader processes per training process: the cores this process may use (its CPU affinity,
    capped by the CPU quota of its cgroup, as a container with ``--cpus`` has) divided among the
    processes of its node (``LOCAL_WORLD_SIZE``, as torchrun sets it); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // processes)


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs' worth of time this process's cgroup may use: cgroup v2 ``cpu.max`` (``"200000
    100000"``: 2.0; ``"max 100000"``: no quota), else v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``
    (a quota of -1: none); None where none is set or readable."""
    def fields(*names: str) -> list[str]:
        words: list[str] = []
        for name in names:
            try:
                with open(os.path.join(root, name)) as file:
                    words += file.read().split()
            except OSError:
                return []
        return words

    for found in (fields("cpu.max"), fields("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),
                  fields("cpu.cfs_quota_us", "cpu.cfs_period_us")):
        try:
            quota, period = float(found[0]), float(found[1])
        except (IndexError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None

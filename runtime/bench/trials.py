"""One trial of a bench: its state on disk, running it to the end, and what it measured.

A trial is an ordinary run directory written by :func:`utdsl.runtime.train.train`, so the bench
keeps no state of its own: a directory without ``config.json`` is *new*, one whose resume state
has reached the recipe's last epoch is *finished* (skipped), anything between is *partial*
(resumed exactly, ``train(..., resume=True)``). :func:`run_trial` is what an executor runs for a
trial, in this process or on a Ray worker: it is idempotent (a retry after a crash resumes).

What a trial measured is read back from its ``metrics.jsonl``: top-1/top-5 of the last epoch row,
and from the ``summary`` row the training loop writes at the end of a session the trainable
parameters, FLOPs of one forward (batch 1), peak memory and training images per second (of the
last session, for a resumed run); without a ``summary`` row, images per second is the mean
training throughput of the epoch rows. Peak memory is the CUDA allocator's peak of the run on a
GPU, and on the CPU the worker process's peak resident set size, which also counts whatever
that process held before (the interpreter, and earlier trials when Ray reuses the worker).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from utdsl.errors import UtdslError

from .plan import Trial
from .suites import BenchError

__all__ = ["TrialJob", "TrialReport", "trial_state", "read_outcome", "check_config", "run_trial", "METRICS"]

#: what a trial reports -> the metrics.jsonl fields it is read from (first present wins)
METRICS: dict[str, tuple[str, ...]] = {
    "trainable_params": ("trainable_params",),
    "flops": ("forward_flops", "flops"),
    "peak_memory_mb": ("peak_memory_mb",),
    "images_per_s": ("train_throughput", "images_per_s"),
}
#: config.json fields that may differ between a trial made earlier and the bench's expectation
VOLATILE = ("utdsl_version",)


@dataclass(frozen=True)
class TrialJob:
    """Everything a worker needs to run one trial: the expected run configuration (JSON data),
    the run directory (absolute), the device kind, CPU threads (0: torch's default) and data
    loader workers."""

    trial: Trial
    run_dir: str
    config: dict[str, Any]
    device: str = "cpu"
    threads: int = 0
    num_workers: int = 0


@dataclass
class TrialReport:
    """How a trial ended: ``done`` (trained now), ``skipped`` (finished before), ``failed``."""

    trial: Trial
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    resumed: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    @property
    def top1(self) -> float | None:
        value = self.metrics.get("top1")
        return float(value) if self.ok and value is not None else None


def _state_epoch(path: Path) -> int | None:
    """The epoch count of a run's resume state (None: no readable state)."""
    from safetensors import safe_open

    state = path / "checkpoints" / "state.safetensors"
    if not state.is_file():
        return None
    try:
        with safe_open(str(state), "pt") as handle:
            meta = handle.metadata() or {}
        return int(json.loads(meta["loop"])["epoch"])
    except Exception:  # noqa: BLE001 - a damaged state is a partial run; train's resume reports it
        return None


def trial_state(run_dir: str | Path) -> str:
    """``new``, ``partial`` or ``finished`` (see the module docstring)."""
    path = Path(run_dir)
    config = path / "config.json"
    if not config.is_file():
        return "new"
    try:
        epochs = int(json.loads(config.read_text(encoding="utf-8"))["recipe"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return "partial"
    epoch = _state_epoch(path)
    return "finished" if epoch is not None and epoch >= epochs else "partial"


def _rows(path: Path) -> list[dict[str, Any]]:
    from ..rundir import RunDir

    return RunDir(path).read_metrics()


def read_outcome(run_dir: str | Path) -> dict[str, Any]:
    """What a finished trial measured: ``top1``, ``top5``, ``epoch`` (of the last evaluated epoch
    row) and whichever of :data:`METRICS` the run wrote (None where absent)."""
    rows = _rows(Path(run_dir))
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    evaluated = [r for r in epochs if "top1" in r]
    last = evaluated[-1] if evaluated else {}
    outcome: dict[str, Any] = {"top1": last.get("top1"), "top5": last.get("top5"), "epoch": last.get("epoch")}
    extra = [r for r in rows if r.get("kind") in ("summary", "profile")]
    for name, keys in METRICS.items():
        outcome[name] = next((row[k] for row in reversed(extra) for k in keys
                              if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)), None)
    if outcome["images_per_s"] is None:
        rates = [r["throughput"] for r in epochs if isinstance(r.get("throughput"), (int, float))]
        outcome["images_per_s"] = sum(rates) / len(rates) if rates else None
    return outcome


def check_config(run_dir: str | Path, expected: Mapping[str, Any]) -> None:
    """A :class:`BenchError` when the trial directory holds a run of another configuration (the
    bench was started with other settings, or the directory was edited)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BenchError(f"{path}: unreadable run configuration ({error})",
                         hint="remove the trial directory to run it again") from None
    differing = sorted(_differences(saved, dict(expected)))
    if differing:
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        raise BenchError(f"trial '{Path(run_dir)}' was made with other settings ({shown} differ)",
                         hint="give the bench another --out, or the settings it was started with")


def _differences(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(expected, dict):
        found = []
        for key in sorted(set(saved) | set(expected)):
            if not prefix and key in VOLATILE:
                continue
            found += _differences(saved.get(key), expected.get(key), f"{prefix}{key}.")
        return found
    if isinstance(saved, list) and isinstance(expected, (list, tuple)):
        saved, expected = list(saved), list(expected)
    if isinstance(saved, float) or isinstance(expected, float):
        try:
            if math.isclose(float(saved), float(expected), rel_tol=1e-12, abs_tol=0.0):
                return []
        except (TypeError, ValueError):
            pass
    return [] if saved == expected else [prefix.rstrip(".")]


def run_trial(job: TrialJob) -> TrialReport:
    """Bring ``job``'s trial to its end: skip it when finished, resume it when partial, train it
    when new. A user error (a :class:`UtdslError`: bad data, a diverged run...) is a ``failed``
    report, never retried; any other exception propagates, so that an executor can retry it."""
    from ..config import RunConfig
    from ..distributed import DistContext
    from ..guard import Interrupted
    from ..train import train

    path = Path(job.run_dir)
    start = time.perf_counter()
    state = trial_state(path)
    if state == "finished":
        return TrialReport(job.trial, "skipped", read_outcome(path))
    import torch

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    try:
        config = None if state == "partial" else RunConfig.model_validate(job.config)
        device = torch.device("cuda" if job.device == "cuda" else "cpu")
        train(config, path, resume=state == "partial", ctx=DistContext(device=device), num_workers=job.num_workers,
              progress=False, echo=lambda text: None, yes=True)
    except Interrupted:  # Ctrl-C stops the bench, not just this trial (its state was saved)
        raise
    except UtdslError as error:
        return TrialReport(job.trial, "failed", error=str(error), resumed=state == "partial",
                           seconds=time.perf_counter() - start)
    return TrialReport(job.trial, "done", read_outcome(path), resumed=state == "partial",
                       seconds=time.perf_counter() - start)
